"""MovieLens in the GroupLens layout (u.data, u.item, u.user) as one interactions frame.

F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History
and Context. ACM TiiS 5, 4, Article 19. See data/ml-100k/README.md for the licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.schema import DataError, DatasetSchema

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]

# The MovieLens 1M age groups, applied to 100K's exact ages.
AGE_BUCKET_EDGES = [18, 25, 35, 45, 50, 56]
AGE_BUCKETS = [1, 18, 25, 35, 45, 50, 56]

MOVIELENS_SCHEMA = DatasetSchema(
    path="",
    user="user_id",
    item="item_id",
    timestamp="timestamp",
    rating="rating",
    categorical=["age_bucket", "gender", "occupation", "zip_prefix", "release_year"],
    multi_valued={"genres": None},
    category="genres",  # a movie's first genre is its category
)


def _read(path: Path, **kwargs) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            f"{path} is missing: a GroupLens MovieLens folder needs u.data, u.item and u.user "
            "(the project ships ML-100K in data/ml-100k)"
        )
    return pd.read_csv(path, header=None, **kwargs)


def load_movielens(folder: str | Path) -> tuple[pd.DataFrame, DatasetSchema]:
    """One row per rating, with the user's and the movie's attributes joined on."""
    folder = Path(folder)
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

    frame = (ratings
             .merge(users[["user_id", "age_bucket", "gender", "occupation", "zip_prefix"]], on="user_id", how="left")
             .merge(items[["item_id", "release_year", "genres"]], on="item_id", how="left"))
    schema = DatasetSchema(**{**MOVIELENS_SCHEMA.__dict__, "path": str(folder)})
    return frame, schema
