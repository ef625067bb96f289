"""The schema of a data set: one YAML file that every stage of plexrec reads.

The feature store's views, the loader, the stream ingester, the training
examples and the scoring service's rows are all derived from it; no module
names one data set's columns. A schema for impressions with user and item
tables (paths relative to the schema file):

    name: kuairand-pure
    path: [impressions_part1.parquet, impressions_part2.parquet]  # Parquet or CSV, one or more
    user: user_id                   # the interactions' user and item id columns
    item: video_id
    timestamp: time_ms
    timestamp_unit: ms              # s (default) or ms
    label: is_click                 # a 0/1 column; or `rating: rating` + `rating_threshold: 4`
    history: positive               # which rows enter a user's history: all (default) | positive
    users:                          # optional: who the user is
      path: user_features.csv       # a table joined by id; without a path the columns are
      id: user_id                   # the interactions' own (the latest row per user)
      categorical: [user_active_degree]
      multi_valued: {}              # {column: separator}; a list column needs no separator (null)
      numeric: [follow_user_num]
    items:                          # optional: what the item is; `title` names it in reports
      path: video_features.csv
      categorical: [author_id, video_type]
      multi_valued: {tag: ","}
      numeric: [video_duration]
      title: null
    category: tag                   # optional: the item's category (a list's first value), for
                                    # sequence models; a column of the items table or the interactions
    context:                        # optional: columns of the interaction row itself; a scoring
      categorical: [tab]            # call sends them in ScoreRequest.context
      numeric: []
    split: null                     # optional column: train / valid / test / context per row
    implicit: null                  # optional, for logs of positives: {negatives: 2, sampler:
                                    # popularity | uniform, seed: 0, rounds: 4}: each positive gets
                                    # that many sampled negatives (features/negatives.py)

Other formats: ``format: grouplens`` reads a MovieLens folder (``path``) through
features/movielens.py; ``format: synthetic`` generates the long-sequence data
of features/synthetic.py with the ``generator`` parameters.

Feature names are column names; the user and item columns are always the
features ``user_id`` and ``item_id``, and the category the feature
``item_category``. Categorical values become raw int64 ids (features/ids.py);
numeric ones enter the tower as sign(x) * log(1 + |x|), a missing value as 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from features.errors import ConfigError
from features.negatives import ImplicitRule, SAMPLERS


class DataError(ValueError):
    """The data does not match its declared schema; the message names the column."""


FORMATS = ("table", "grouplens", "synthetic")
TIMESTAMP_UNITS = {"s": 1, "ms": 1000}  # units per second
HISTORY_RULES = ("all", "positive")
# the context of an event (features/events.py) and of a scoring request (serving/requests.py): at most
# this many entries, each key and value at most this long
MAX_CONTEXT_ENTRIES = 32
MAX_CONTEXT_TEXT = 256
# feature names plexrec gives to the id and category columns, and names its views use
ID_FEATURES = ("user_id", "item_id")
CATEGORY_FEATURE = "item_category"
RESERVED = {*ID_FEATURES, CATEGORY_FEATURE, "timestamp", "label", "event_timestamp", "history_item_ids",
            "history_timestamps", "interaction_count", "user_interaction_count", "item_interaction_count"}


@dataclass
class FeatureGroup:
    """Columns that describe one thing: the user, the item, or the interaction (context)."""

    path: str | list[str] | None = None  # a table of its own, joined by id (users and items only)
    id: str | None = None  # the table's id column (default: the interactions' user / item column)
    categorical: list[str] = field(default_factory=list)
    multi_valued: dict[str, str | None] = field(default_factory=dict)
    numeric: list[str] = field(default_factory=list)
    title: str | None = None  # items only: a human-readable name for reports

    @property
    def columns(self) -> list[str]:
        return [*self.categorical, *self.multi_valued, *self.numeric]

    @property
    def paths(self) -> list[str]:
        return [] if self.path is None else [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass
class DatasetSchema:
    user: str
    item: str
    timestamp: str
    path: str | list[str] = ""
    name: str = "dataset"
    format: str = "table"
    timestamp_unit: str = "s"
    rating: str | None = None
    rating_threshold: float = 4.0
    label: str | None = None
    history: str = "all"
    users: FeatureGroup = field(default_factory=FeatureGroup)
    items: FeatureGroup = field(default_factory=FeatureGroup)
    context: FeatureGroup = field(default_factory=FeatureGroup)
    category: str | None = None
    split: str | None = None
    generator: dict = field(default_factory=dict)  # format synthetic: SyntheticConfig fields
    implicit: dict | None = None  # sampled negatives per positive (features/negatives.py ImplicitRule)

    def __post_init__(self) -> None:
        for group_name in ("users", "items", "context"):
            group = getattr(self, group_name)
            if isinstance(group, dict):
                setattr(self, group_name, _group(group, group_name))
        if self.implicit is not None:
            self.implicit = _implicit(self.implicit)
        self.validate()

    def validate(self) -> None:
        if (self.rating is None) == (self.label is None):
            raise ConfigError("schema: declare exactly one of 'rating' (labelled by rating_threshold) or 'label' "
                              "(a 0/1 column)")
        if self.format not in FORMATS:
            raise ConfigError(f"schema format = {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ConfigError(f"schema timestamp_unit = {self.timestamp_unit!r}: choose one of "
                              f"{', '.join(TIMESTAMP_UNITS)}")
        if self.history not in HISTORY_RULES:
            raise ConfigError(f"schema history = {self.history!r}: choose all (every row enters the user's "
                              "history) or positive (rows labelled 1 only)")
        if self.context.path or self.context.id or self.context.title:
            raise ConfigError("schema context: context columns are the interactions' own; it takes no path, id "
                              "or title")
        if self.users.title:
            raise ConfigError("schema users.title: only items have a title")
        seen: dict[str, str] = {}
        for group_name in ("users", "items", "context"):
            for column in getattr(self, group_name).columns:
                if column in RESERVED or column in (self.user, self.item, self.timestamp):
                    raise ConfigError(f"schema {group_name}: column '{column}' is an id, the timestamp or a "
                                      f"name plexrec reserves ({', '.join(sorted(RESERVED))}); rename it")
                if column in seen:
                    raise ConfigError(f"schema: column '{column}' is declared twice ({seen[column]} and "
                                      f"{group_name}); a feature belongs to one group")
                seen[column] = group_name

    # --- the features, whatever group declares them ---

    @property
    def categorical(self) -> list[str]:
        return [*self.users.categorical, *self.items.categorical, *self.context.categorical]

    @property
    def multi_valued(self) -> dict[str, str | None]:
        return {**self.users.multi_valued, **self.items.multi_valued, **self.context.multi_valued}

    @property
    def numeric(self) -> list[str]:
        return [*self.users.numeric, *self.items.numeric, *self.context.numeric]

    @property
    def categorical_features(self) -> list[str]:
        """Every categorical feature the data set offers, under its feature name."""
        names = [*ID_FEATURES, *self.categorical, *self.multi_valued]
        return names + [CATEGORY_FEATURE] if self.category else names

    @property
    def units_per_second(self) -> int:
        return TIMESTAMP_UNITS[self.timestamp_unit]

    def required_columns(self) -> list[str]:
        cols = [self.user, self.item, self.timestamp, self.rating or self.label, *self.categorical,
                *self.multi_valued, *self.numeric, self.category, self.split]
        return [c for c in dict.fromkeys(cols) if c is not None]

    def interaction_columns(self) -> list[str]:
        """The columns the interactions file(s) must hold (profiles with a table of their own aside)."""
        cols = [self.user, self.item, self.timestamp, self.rating or self.label, *self.context.columns, self.split]
        for group in (self.users, self.items):
            if not group.paths:
                cols += group.columns + ([group.title] if group.title else [])
        if self.category and not self.items.paths:
            cols.append(self.category)
        return [c for c in dict.fromkeys(cols) if c is not None]

    def group_of(self, feature: str) -> str:
        """'users', 'items' or 'context': who a feature describes."""
        if feature == "user_id":
            return "users"
        if feature in ("item_id", CATEGORY_FEATURE):
            return "items"
        for group_name in ("users", "items", "context"):
            if feature in getattr(self, group_name).columns:
                return group_name
        raise KeyError(feature)

    # --- the contract a model and a store share ---

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "schema") -> DatasetSchema:
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        legacy = sorted(set(raw) & {"categorical", "multi_valued", "numeric"})
        if legacy:
            raise ConfigError(f"{where}: top-level {legacy} no longer exist; declare each column under the group it "
                              "describes: users, items or context (see features/schema.py)")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("user", "item", "timestamp") if not raw.get(k)]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def contract(self) -> dict[str, Any]:
        """What a model and a store must agree on: roles, features and their groups, rules
        (not where the files are, nor how the data was split)."""
        contract = self.to_dict()
        for key in ("path", "name", "format", "generator", "split"):
            contract.pop(key)
        if contract["implicit"] is None:  # the contract (and fingerprint) of a schema without it is unchanged
            contract.pop("implicit")
        for group_name in ("users", "items"):
            contract[group_name].pop("path")
            contract[group_name].pop("title")
        return contract

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.contract(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: DatasetSchema) -> list[str]:
        """'key: this != other' for every contract key that differs."""
        mine, theirs = _flatten(self.contract()), _flatten(other.contract())
        return [f"{key}: {mine.get(key)!r} != {theirs.get(key)!r}"
                for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetSchema:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"schema file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"schema {path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"schema {path}: expected a mapping of keys at the top level")
        raw.setdefault("name", path.parent.name if path.stem == "schema" else path.stem)
        if raw.get("format", "table") != "synthetic" and not raw.get("path"):
            raise ConfigError(f"schema {path}: missing key 'path' (the interactions file(s))")
        schema = cls.from_dict(raw, where=f"schema {path}")
        schema.path = _relative_to(schema.path, path.parent)
        for group in (schema.users, schema.items):
            if group.path:
                group.path = _relative_to(group.path, path.parent)
        return schema


def value_text(value: Any) -> str | None:
    """A categorical value as the store keeps it when its column's type is not known (an event's
    attribute, an item's category): text, integers as integers ("3", not "3.0"), missing as None.
    Its raw id (features/ids.py value_to_id) equals the value's own."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    try:  # pandas' missing markers (NA, NaT) and numpy scalars
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item") and not isinstance(value, str):
        return value_text(value.item())
    return str(value)


def first_value(cell: Any, separator: str | None) -> str | None:
    """The first value of a (possibly multi-valued) cell as text: an item's category."""
    if isinstance(cell, (list, tuple)) or (hasattr(cell, "tolist") and not isinstance(cell, str)
                                           and getattr(cell, "ndim", 0) == 1):
        values = list(cell)
        return value_text(values[0]) if values else None
    if isinstance(cell, str) and separator:
        first = cell.split(separator)[0]
        return first if first != "" else None
    return value_text(cell)


def _relative_to(value: str | list[str], folder: Path) -> str | list[str]:
    def one(p: str) -> str:
        return p if Path(p).is_absolute() else str(folder / p)

    return one(value) if isinstance(value, str) else [one(p) for p in value]


def _group(raw: Any, name: str) -> FeatureGroup:
    if not isinstance(raw, dict):
        raise ConfigError(f"schema {name}: expected a mapping (categorical, multi_valued, numeric, ...)")
    known = {f.name for f in dataclasses.fields(FeatureGroup)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"schema {name}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    group = FeatureGroup(**raw)
    if not isinstance(group.categorical, list) or not isinstance(group.numeric, list):
        raise ConfigError(f"schema {name}: categorical and numeric are lists of column names")
    if not isinstance(group.multi_valued, dict):
        raise ConfigError(f"schema {name}.multi_valued: a mapping of column -> separator (null for list columns)")
    return group


def _implicit(raw: Any) -> dict[str, Any]:
    """The ``implicit`` setting, every key filled in (so the contract names the whole rule)."""
    if not isinstance(raw, dict):
        raise ConfigError("schema implicit: expected a mapping {negatives, sampler, seed, rounds}")
    known = {f.name for f in dataclasses.fields(ImplicitRule)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"schema implicit: unknown key(s) {unknown}; known keys: {sorted(known)}")
    rule = dataclasses.asdict(ImplicitRule(**raw))
    for key in ("negatives", "rounds", "seed"):
        if not isinstance(rule[key], int) or isinstance(rule[key], bool) or rule[key] < (0 if key == "seed" else 1):
            raise ConfigError(f"schema implicit.{key} = {rule[key]!r}: expected an integer >= "
                              f"{0 if key == 'seed' else 1}")
    if rule["sampler"] not in SAMPLERS:
        raise ConfigError(f"schema implicit.sampler = {rule['sampler']!r}: choose one of {', '.join(SAMPLERS)}")
    return rule


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}
