"""A data set's files, as its schema describes them: interactions, and user and item tables.

    tables = read_tables(schema)      # features/datasets.py; or DatasetTables(schema, interactions, users, items)
    frame = tables.joined()           # one row per interaction, profiles joined on by id

The interactions keep the schema's column names. ``users`` and ``items`` hold one
row per id (the id under the interactions' column name) and their group's columns:
read from their own table when the schema gives one (a catalogue: it may name
users and items without interactions), else taken from the interactions (the
latest row per id). The feature store loads these three tables; training
builds examples from the joined frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from features.schema import DataError, DatasetSchema, FeatureGroup


@dataclass
class DatasetTables:
    schema: DatasetSchema
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame

    def joined(self) -> pd.DataFrame:
        """The interactions with their user's and item's columns."""
        frame = self.interactions
        for table, key in ((self.users, self.schema.user), (self.items, self.schema.item)):
            columns = [c for c in table.columns if c != key]
            frame = frame.drop(columns=[c for c in columns if c in frame.columns])
            if columns:
                frame = frame.merge(table, on=key, how="left", validate="many_to_one")
        return frame

    def with_interactions(self, interactions: pd.DataFrame) -> DatasetTables:
        """The same catalogue (profiles), other interactions: e.g. only the past of a time cut."""
        return DatasetTables(self.schema, interactions.reset_index(drop=True), self.users, self.items)

    def title_of(self) -> dict:
        """item id -> its title, where the schema names a title column; else {}."""
        title = self.schema.items.title
        if not title or title not in self.items.columns:
            return {}
        return dict(zip(self.items[self.schema.item], self.items[title]))


def read_table(paths: list[str], what: str) -> pd.DataFrame:
    """One frame from Parquet / CSV / TSV files (concatenated in the order given)."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{what} file {path} does not exist")
        if path.suffix in (".parquet", ".pq"):
            frames.append(pd.read_parquet(path))
        elif path.suffix in (".csv", ".tsv"):
            frames.append(pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ","))
        else:
            raise DataError(f"{path}: unsupported format '{path.suffix}'; use .parquet, .csv or .tsv")
    if not frames:
        raise DataError(f"{what}: no file given (schema 'path')")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def check_columns(frame: pd.DataFrame, columns: list[str], where: str) -> None:
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"column '{column}' is declared in the schema but missing from {where} "
                            f"(columns present: {', '.join(map(str, frame.columns))}); fix the schema or the file")


def profile_table(schema: DatasetSchema, group: FeatureGroup, key: str, interactions: pd.DataFrame,
                  what: str) -> pd.DataFrame:
    """One row per id with the group's columns (and, for items, the category and title)."""
    wanted = list(dict.fromkeys([*group.columns, *([group.title] if group.title else [])]))
    category = schema.category if what == "items" else None
    if group.paths:
        table = read_table(group.paths, f"schema {what}")
        table_key = group.id or key
        check_columns(table, [table_key, *wanted], f"the {what} table ({', '.join(group.paths)})")
        if category and category not in wanted and category in table.columns:
            wanted.append(category)
        table = table[[table_key, *wanted]].rename(columns={table_key: key})
        if table[key].isna().any():
            raise DataError(f"the {what} table has rows without an id (column '{table_key}')")
    else:
        if category and category not in wanted:
            wanted.append(category)
        table = interactions[[key, *wanted]]
    table = table.drop_duplicates(key, keep="last")
    if category and category not in table.columns:
        if category not in interactions.columns:
            raise DataError(f"column '{category}' (schema 'category') is in neither the items table nor the "
                            "interactions")
        table = table.merge(interactions[[key, category]].drop_duplicates(key, keep="last"), on=key, how="outer")
    return table.reset_index(drop=True)


def tables_from_frame(interactions: pd.DataFrame, schema: DatasetSchema,
                      where: str = "the interactions") -> DatasetTables:
    """Tables of an in-memory interactions frame (profile tables still read from their files)."""
    check_columns(interactions, schema.interaction_columns(), where)
    for column in (schema.user, schema.item, schema.timestamp):
        if interactions[column].isna().any():
            raise DataError(f"column '{column}' has missing values; every interaction needs a user, an item "
                            "and a timestamp")
    users = profile_table(schema, schema.users, schema.user, interactions, "users")
    items = profile_table(schema, schema.items, schema.item, interactions, "items")
    keep = [c for c in schema.interaction_columns() if c in interactions.columns]
    return DatasetTables(schema, interactions[keep].reset_index(drop=True), users, items)
