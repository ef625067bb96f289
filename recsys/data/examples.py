"""Interactions -> training examples: labels, temporal split, histories, raw ids.

One example per interaction. A user's interactions are put in time order (ties
keep file order); the last ``n`` are test, the ``n`` before them validation,
the rest training. An example's history is the user's items with a timestamp
strictly before its own: interactions of the same second are not each other's
history (their order is unknown), which is also what a point-in-time join in
the feature store returns.

Categorical values become raw int64 ids (integers, and strings that spell one,
as they are; other strings through ``recsys.hashing.string_to_id``); the model hashes them itself. A missing value
is an empty bag. Dense features are counters known at the example's time:
log(1 + the user's earlier interactions) and log(1 + the item's interactions
by anyone strictly earlier in time), plus any declared numeric columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.schema import DataError, DatasetSchema
from recsys.hashing import string_to_id

TRAIN, VALID, TEST, CONTEXT = 0, 1, 2, 3
SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "validation": VALID, "test": TEST, "context": CONTEXT}
DERIVED_DENSE = ["log_user_prior_count", "log_item_prior_count"]


@dataclass
class Examples:
    """Column arrays of n examples; jagged features as (values, offsets of length n+1)."""

    feature_values: dict[str, np.ndarray]
    feature_offsets: dict[str, np.ndarray]
    dense: np.ndarray  # [n, num_dense] float32
    dense_names: list[str]
    label: np.ndarray  # [n] float32
    user_id: np.ndarray  # [n] raw user id
    item_id: np.ndarray  # [n] raw item id
    timestamp: np.ndarray  # [n] int64
    split: np.ndarray  # [n] int8: TRAIN / VALID / TEST / CONTEXT (history only, never an example)
    # histories: every user's time-ordered items, concatenated; example i's history is
    # sequence_items[sequence_start[i] : sequence_start[i] + history_length[i]]
    sequence_items: np.ndarray
    sequence_timestamps: np.ndarray
    sequence_categories: np.ndarray | None  # the items' categories, where the data declares one
    sequence_start: np.ndarray
    position: np.ndarray  # index in the user's time-ordered sequence
    history_length: np.ndarray  # the user's interactions strictly earlier in time (<= position)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def feature_names(self) -> list[str]:
        return list(self.feature_values)

    def history(self, i: int, max_len: int) -> np.ndarray:
        """The at most ``max_len`` most recent items before example ``i``, oldest first."""
        start, end, _ = self.history_ranges(np.array([i]), max_len)
        return self.sequence_items[start[0]:end[0]]

    def history_ranges(self, index: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(start, end) into the sequence arrays of each example's history, truncated to
        the ``max_len`` most recent items, and how many histories were truncated."""
        end = self.sequence_start[index] + self.history_length[index]
        start = np.maximum(self.sequence_start[index], end - max_len)
        return start, end, int((self.history_length[index] > max_len).sum())

    def subset(self, index: np.ndarray) -> Examples:
        index = np.asarray(index)
        values, offsets = {}, {}
        for name in self.feature_values:
            values[name], offsets[name] = take_jagged(self.feature_values[name], self.feature_offsets[name], index)
        return Examples(
            feature_values=values, feature_offsets=offsets, dense=self.dense[index], dense_names=self.dense_names,
            label=self.label[index], user_id=self.user_id[index], item_id=self.item_id[index],
            timestamp=self.timestamp[index], split=self.split[index],
            # the sequences stay whole: examples point into them
            sequence_items=self.sequence_items, sequence_timestamps=self.sequence_timestamps,
            sequence_categories=self.sequence_categories,
            sequence_start=self.sequence_start[index], position=self.position[index],
            history_length=self.history_length[index])

    def split_part(self, part: int) -> Examples:
        return self.subset(np.flatnonzero(self.split == part))


def take_jagged(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``index`` of a jagged array, as a new (values, offsets)."""
    lengths = offsets[1:] - offsets[:-1]
    picked_lengths = lengths[index]
    new_offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(picked_lengths, out=new_offsets[1:])
    # position of every picked value in the source: its row's start + its rank in the row
    starts = np.repeat(offsets[:-1][index], picked_lengths)
    rank = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], picked_lengths)
    return values[starts + rank], new_offsets


def load_interactions(schema: DatasetSchema) -> pd.DataFrame:
    """Read a generic interactions file (Parquet or CSV) and check its declared columns."""
    path = Path(schema.path)
    if not path.is_file():
        raise DataError(f"interactions file {path} does not exist (schema 'path')")
    if path.suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    elif path.suffix in (".csv", ".tsv"):
        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unsupported format '{path.suffix}'; use .parquet or .csv")
    return frame


def _check_columns(frame: pd.DataFrame, schema: DatasetSchema) -> None:
    for column in schema.required_columns():
        if column not in frame.columns:
            raise DataError(
                f"column '{column}' is declared in the schema but missing from the data "
                f"(columns present: {', '.join(map(str, frame.columns))}); fix the schema or the file"
            )


def value_to_id(value) -> int:
    """The raw id of one categorical value.

    Integers are their own id; so is a string that spells an integer ("85"), so a
    CSV column and the same column typed in Parquet give the same ids. Any other
    string goes through ``string_to_id``.
    """
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    text = str(value)
    if _INTEGER.fullmatch(text):
        return int(text)
    return string_to_id(text)


_INTEGER = re.compile(r"-?[0-9]{1,18}")


def _raw_ids(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Single-valued column -> (raw ids, offsets); a missing value is an empty bag."""
    present = column.notna().to_numpy()
    codes, uniques = pd.factorize(column[present])
    ids = np.fromiter((value_to_id(v) for v in uniques), dtype=np.int64, count=len(uniques))[codes]
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(present, out=offsets[1:])
    return ids, offsets


def _multi_raw_ids(column: pd.Series, separator: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Multi-valued column (lists, or strings split on ``separator``) -> jagged raw ids."""
    def as_list(cell) -> list:
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            return []
        if isinstance(cell, str):
            return [] if cell == "" else cell.split(separator) if separator else [cell]
        if isinstance(cell, (list, tuple, np.ndarray)):
            return list(cell)
        return [cell]

    lists = [as_list(c) for c in column]
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = [v for x in lists for v in x]
    ids = np.fromiter((value_to_id(v) for v in flat), dtype=np.int64, count=len(flat))
    return ids, offsets


def _count_strictly_before(keys: np.ndarray, times: np.ndarray) -> np.ndarray:
    """For every row: how many rows with the same key have a smaller time."""
    order = np.lexsort((times, keys))
    sorted_keys, sorted_times = keys[order], times[order]
    group_start = np.searchsorted(sorted_keys, sorted_keys, side="left")
    # rows of the same key with time < t = (first row of the run of equal (key, t)) - (key's first row)
    new_run = np.ones(len(order), dtype=bool)
    new_run[1:] = (sorted_keys[1:] != sorted_keys[:-1]) | (sorted_times[1:] != sorted_times[:-1])
    first_same_time = np.flatnonzero(new_run)[np.cumsum(new_run) - 1]
    counts = np.empty(len(order), dtype=np.int64)
    counts[order] = first_same_time - group_start
    return counts


def build_examples(frame: pd.DataFrame, schema: DatasetSchema, *, label_threshold: float = 4.0,
                   eval_last_n: int = 5) -> Examples:
    """All examples of an interactions frame, split and with histories."""
    _check_columns(frame, schema)
    if len(frame) == 0:
        raise DataError("the interactions file has no rows")
    for column in (schema.user, schema.item, schema.timestamp):
        if frame[column].isna().any():
            raise DataError(f"column '{column}' has missing values; every interaction needs a "
                            "user, an item and a timestamp")
    # time order per user; a stable sort keeps file order among equal timestamps
    frame = frame.sort_values([schema.user, schema.timestamp], kind="stable").reset_index(drop=True)
    user_raw, _ = _raw_ids(frame[schema.user])
    item_raw, _ = _raw_ids(frame[schema.item])
    timestamp = frame[schema.timestamp].to_numpy(dtype=np.int64)
    n = len(frame)

    user_change = np.ones(n, dtype=bool)
    user_change[1:] = user_raw[1:] != user_raw[:-1]
    user_first_row = np.flatnonzero(user_change)
    user_index = np.cumsum(user_change) - 1
    sequence_start = user_first_row[user_index]
    position = np.arange(n) - sequence_start
    user_length = np.diff(np.append(user_first_row, n))[user_index]

    if schema.split:
        names = frame[schema.split].astype(str).str.lower()
        unknown = sorted(set(names) - set(SPLIT_NAMES))
        if unknown:
            raise DataError(f"column '{schema.split}' has split value(s) {unknown}; use train, valid, test")
        split = names.map(SPLIT_NAMES).to_numpy(dtype=np.int8)
    else:
        from_end = user_length - position  # 1 for the user's last interaction
        split = np.where(from_end <= eval_last_n, TEST,
                         np.where(from_end <= 2 * eval_last_n, VALID, TRAIN)).astype(np.int8)

    if schema.label:
        label = frame[schema.label].to_numpy(dtype=np.float32)
        if not np.isin(label, (0.0, 1.0)).all():
            raise DataError(f"column '{schema.label}' must hold 0/1 labels")
    else:
        label = (frame[schema.rating].to_numpy(dtype=np.float64) >= label_threshold).astype(np.float32)

    values, offsets = {"user_id": user_raw, "item_id": item_raw}, {}
    offsets["user_id"] = offsets["item_id"] = np.arange(n + 1, dtype=np.int64)
    for column in schema.categorical:
        values[column], offsets[column] = _raw_ids(frame[column])
    for column, separator in schema.multi_valued.items():
        values[column], offsets[column] = _multi_raw_ids(frame[column], separator)
    sequence_categories = None
    if schema.category:
        if schema.category in values:
            category_values, category_offsets = values[schema.category], offsets[schema.category]
        elif frame[schema.category].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
            category_values, category_offsets = _multi_raw_ids(frame[schema.category], None)
        else:
            category_values, category_offsets = _raw_ids(frame[schema.category])
        if (np.diff(category_offsets) == 0).any():
            raise DataError(f"column '{schema.category}' (the item category) has missing values")
        sequence_categories = category_values[category_offsets[:-1]]  # a list's first value
        values["item_category"] = sequence_categories
        offsets["item_category"] = np.arange(n + 1, dtype=np.int64)

    history_length = _count_strictly_before(user_raw, timestamp)
    dense_columns = [np.log1p(history_length).astype(np.float32),
                     np.log1p(_count_strictly_before(item_raw, timestamp)).astype(np.float32)]
    for column in schema.numeric:
        numeric = pd.to_numeric(frame[column], errors="coerce")
        if numeric.isna().any():
            raise DataError(f"column '{column}' is declared numeric but has missing or non-numeric values")
        dense_columns.append(numeric.to_numpy(dtype=np.float32))

    return Examples(
        feature_values=values, feature_offsets=offsets,
        dense=np.stack(dense_columns, axis=1), dense_names=DERIVED_DENSE + list(schema.numeric),
        label=label, user_id=user_raw, item_id=item_raw, timestamp=timestamp, split=split,
        sequence_items=item_raw, sequence_timestamps=timestamp, sequence_categories=sequence_categories,
        sequence_start=sequence_start.astype(np.int64), position=position.astype(np.int64),
        history_length=history_length,
    )


def load_dataset(data_config) -> tuple[Examples, DatasetSchema]:
    """The examples a run config's ``data`` section describes."""
    from recsys.config import ConfigError, resolve_path
    from recsys.data.movielens import load_movielens

    if data_config.source == "feast":  # the feature store's point-in-time view of the same data
        from features.store import open_store
        from features.training import examples_from_store
        from recsys.data.movielens import MOVIELENS_SCHEMA

        store = open_store("local", data_config.store_dir)
        examples = examples_from_store(store, data_config.store_dir, label_threshold=data_config.label_threshold,
                                       eval_last_n=data_config.eval_last_n)
        return examples, MOVIELENS_SCHEMA
    if data_config.dataset == "ml100k":
        frame, schema = load_movielens(resolve_path(data_config.path))
    elif data_config.dataset == "synthetic":
        from recsys.data.synthetic import SyntheticConfig, generate

        try:
            synthetic = SyntheticConfig(**data_config.synthetic)
        except TypeError as exc:
            raise ConfigError(f"data.synthetic: {exc}; see recsys/data/synthetic.py") from None
        frame, schema = generate(synthetic)
    else:
        schema = DatasetSchema.from_yaml(resolve_path(data_config.schema))
        frame = load_interactions(schema)
    examples = build_examples(frame, schema, label_threshold=data_config.label_threshold,
                              eval_last_n=data_config.eval_last_n)
    return examples, schema
