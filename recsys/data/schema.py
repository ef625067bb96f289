"""The schema of an interactions data set: which column plays which role.

Any real data set plugs in by describing its one interactions file (Parquet or
CSV, one row per user-item event, user and item attributes as extra columns) in
a small YAML file:

    path: interactions.parquet      # relative to the schema file
    user: user_id
    item: item_id
    timestamp: ts                   # seconds, or any sortable integer
    rating: rating                  # or `label: clicked` for a 0/1 column
    categorical: [gender, occupation]
    multi_valued: {genres: "|"}     # list columns, or strings split on the separator
    numeric: [price]
    category: genre                 # optional: the item's category, for sequence models
    split: split                    # optional: "train" / "valid" / "test" per row,
                                    # or "context": in histories, but not an example

Feature names are column names; the user and item columns are always the
features ``user_id`` and ``item_id``, and the category column the feature
``item_category`` (a list-valued category column contributes its first value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recsys.config import ConfigError


class DataError(ValueError):
    """The data does not match its declared schema; the message names the column."""


@dataclass
class DatasetSchema:
    path: str
    user: str
    item: str
    timestamp: str
    rating: str | None = None
    label: str | None = None
    categorical: list[str] = field(default_factory=list)
    multi_valued: dict[str, str | None] = field(default_factory=dict)
    numeric: list[str] = field(default_factory=list)
    category: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if (self.rating is None) == (self.label is None):
            raise ConfigError("schema: declare exactly one of 'rating' (labelled by threshold) or 'label'")

    @property
    def categorical_features(self) -> list[str]:
        """Every categorical feature the data set offers, under its feature name."""
        names = ["user_id", "item_id", *self.categorical, *self.multi_valued]
        return names + ["item_category"] if self.category else names

    def required_columns(self) -> list[str]:
        cols = [self.user, self.item, self.timestamp, self.rating or self.label]
        cols += self.categorical + list(self.multi_valued) + self.numeric
        cols += [c for c in (self.category, self.split) if c]
        return [c for c in cols if c is not None]

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetSchema:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"schema file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        missing = [k for k in ("path", "user", "item", "timestamp") if k not in raw]
        if missing:
            raise ConfigError(f"schema {path}: missing key(s) {missing}")
        try:
            schema = cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"schema {path}: {exc}") from None
        data_path = Path(schema.path)
        if not data_path.is_absolute():
            schema.path = str(path.parent / data_path)
        return schema
