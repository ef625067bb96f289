"""MovieLens in the GroupLens layout (u.data, u.item, u.user) as one interactions frame.

F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History
and Context. ACM TiiS 5, 4, Article 19. See data/ml-100k/README.md for the licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from features.schema import DataError, DatasetSchema
from features.tables import DatasetTables

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]

# The MovieLens 1M age groups, applied to 100K's exact ages.
AGE_BUCKET_EDGES = [18, 25, 35, 45, 50, 56]
AGE_BUCKETS = [1, 18, 25, 35, 45, 50, 56]

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data" / "ml-100k" / "schema.yaml"


def movielens_schema(folder: str | Path | None = None) -> DatasetSchema:
    """The shipped MovieLens schema (data/ml-100k/schema.yaml), reading ``folder`` if given."""
    schema = DatasetSchema.from_yaml(SCHEMA_FILE)
    if folder is not None:
        schema.path = str(folder)
    return schema


def _read(path: Path, **kwargs) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            f"{path} is missing: a GroupLens MovieLens folder needs u.data, u.item and u.user "
            "(the project ships ML-100K in data/ml-100k)"
        )
    return pd.read_csv(path, header=None, **kwargs)


def movielens_tables(schema: DatasetSchema) -> DatasetTables:
    """Ratings, users and movies of a GroupLens folder (schema ``path``), derived columns added."""
    folder = Path(schema.path)
    ratings = _read(folder / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    users = _read(folder / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"],
                  dtype={"zip": str})
    items = _read(folder / "u.item", sep="|", encoding="latin-1",
                  names=["item_id", "title", "release_date", "video_release_date", "url", *GENRES])

    users["age_bucket"] = np.asarray(AGE_BUCKETS)[np.searchsorted(AGE_BUCKET_EDGES, users["age"], side="right")]
    users["zip_prefix"] = users["zip"].str[:2]
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items["release_year"] = year.astype("Int64")  # missing dates stay missing: an empty bag
    flags = items[GENRES].to_numpy(dtype=bool)
    items["genres"] = [[g for g, on in zip(GENRES, row) if on] for row in flags]
    return DatasetTables(schema, ratings,
                         users[["user_id", "age_bucket", "gender", "occupation", "zip_prefix"]],
                         items[["item_id", "release_year", "genres", "title"]])


def load_movielens(folder: str | Path) -> tuple[pd.DataFrame, DatasetSchema]:
    """One row per rating, with the user's and the movie's attributes joined on."""
    schema = movielens_schema(folder)
    return movielens_tables(schema).joined(), schema
