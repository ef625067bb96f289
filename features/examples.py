"""Training examples: the ``Examples`` arrays, and how they are built, in one place.

Interactions -> examples (``build_examples``, the direct loader): labels, temporal split,
histories, raw ids.

One example per interaction. A user's interactions are put in time order (ties
keep file order) and split (``SplitRule``): per user, the last ``n`` are test and
the ``n`` before them validation; or by time, one cut for everyone. An example's
history is the user's *behaviours* (every row, or the positive ones: the schema's
``history`` rule) with a timestamp strictly before its own: interactions of the
same instant are not each other's history (their order is unknown), which is also
what a point-in-time join in the feature store returns.

Categorical values become raw int64 ids (features/ids.py: integers, and strings that
spell one, as they are; other strings through ``string_to_id``); the model hashes them
itself. A missing value is an empty bag, and an item without a category has category 0.
Dense features are counters known at the example's time: log(1 + the user's earlier
behaviours) and log(1 + the item's behaviours by anyone strictly earlier in time), plus the
declared numeric columns as sign(x) * log(1 + |x|) (missing: 0).

Feature-store rows -> Examples (``examples_from_feature_rows``): the one conversion training
and serving share. A "feature row" frame has one row per (user, item, time) with the columns the
``ranker`` feature service returns, named as the schema names its features:
``user_id``, ``item_id``, ``timestamp`` (the schema's unit), the label column,
the users, items and context columns, ``item_category`` (text),
``history_item_ids`` / ``history_timestamps`` (oldest first) and the two counters
``user_interaction_count`` / ``item_interaction_count``. Training gets these rows
from a point-in-time join (features/training.py), serving from the online store
(serving/inputs.py); both call ``examples_from_feature_rows``, so the model inputs
cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.ids import cell_values, value_to_id
from features.negatives import ImplicitRule, catalogue, sample_negatives
from features.schema import CATEGORY_FEATURE, DataError, DatasetSchema, FeatureGroup
from features.tables import check_columns

TRAIN, VALID, TEST, CONTEXT = 0, 1, 2, 3
SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "validation": VALID, "test": TEST, "context": CONTEXT}
DERIVED_DENSE = ["log_user_prior_count", "log_item_prior_count"]
log = logging.getLogger("plexrec.features")
NO_CATEGORY = 0  # the category id of an item whose category is missing or unknown


@dataclass(frozen=True)
class SplitRule:
    """How examples are split into train / valid / test (see DataConfig)."""

    kind: str = "last_n"  # "last_n" per user, or "time": one cut for everyone
    last_n: int = 5
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    valid_from: int | None = None  # time cuts in the schema's unit (instead of the fractions)
    test_from: int | None = None

    @classmethod
    def of(cls, data_config) -> SplitRule:
        return cls(data_config.split, data_config.eval_last_n, data_config.valid_fraction,
                   data_config.test_fraction, data_config.valid_from, data_config.test_from)

    def time_cuts(self, timestamps: np.ndarray) -> tuple[int, int]:
        """(valid_from, test_from): rows at or after a cut belong to its part."""
        ordered = np.sort(timestamps)
        n = len(ordered)
        test_from = self.test_from if self.test_from is not None else int(
            ordered[min(n - 1, int(n * (1 - self.test_fraction)))])
        valid_from = self.valid_from if self.valid_from is not None else int(
            ordered[min(n - 1, int(n * (1 - self.test_fraction - self.valid_fraction)))])
        if valid_from > test_from:
            raise DataError(f"data.valid_from {valid_from} is after data.test_from {test_from}")
        return valid_from, test_from


def numeric_values(column: pd.Series, name: str) -> np.ndarray:
    """A numeric feature as the tower reads it: sign(x) * log(1 + |x|), missing values 0."""
    numeric = pd.to_numeric(column, errors="coerce")
    bad = numeric.isna() & column.notna()
    if bad.any():
        raise DataError(f"column '{name}' is declared numeric but holds {column[bad].iloc[0]!r}")
    return signed_log1p(numeric.fillna(0).to_numpy(dtype=np.float64))


def signed_log1p(values: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|) as float32: how every numeric feature enters the tower."""
    return (np.sign(values) * np.log1p(np.abs(values))).astype(np.float32)


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
    history_length: np.ndarray  # the user's behaviours strictly earlier in time (<= position)
    schema: DatasetSchema | None = None  # what the data set declared; travels into exported models

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
            history_length=self.history_length[index], schema=self.schema)

    def keep_dense(self, names: list[str] | None) -> Examples:
        """The same examples with only the dense features ``names`` (None: all), in that order."""
        if names is None:
            return self
        unknown = [n for n in names if n not in self.dense_names]
        if unknown:
            raise DataError(f"data.dense: {unknown[0]!r} is not a dense feature of the data set "
                            f"({', '.join(self.dense_names)})")
        columns = [self.dense_names.index(n) for n in names]
        return dataclasses.replace(self, dense=np.ascontiguousarray(self.dense[:, columns], dtype=np.float32)
                                   .reshape(len(self), len(columns)), dense_names=list(names))

    def split_part(self, part: int) -> Examples:
        return self.subset(np.flatnonzero(self.split == part))


def take_jagged(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``index`` of a jagged array, as a new (values, offsets)."""
    picked_lengths = offsets[index + 1] - offsets[index]  # the picked rows' only: cost per batch, not per data set
    new_offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(picked_lengths, out=new_offsets[1:])
    # position of every picked value in the source: its row's start + its rank in the row
    starts = np.repeat(offsets[:-1][index], picked_lengths)
    rank = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], picked_lengths)
    return values[starts + rank], new_offsets


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
    lists = [cell_values(c, separator) for c in column]
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = [v for x in lists for v in x]
    ids = np.fromiter((value_to_id(v) for v in flat), dtype=np.int64, count=len(flat))
    return ids, offsets


def _count_strictly_before(keys: np.ndarray, times: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """For every row: how many rows with the same key have a smaller time (rows counted with
    ``weights``, 1 each by default)."""
    order = np.lexsort((times, keys))
    sorted_keys, sorted_times = keys[order], times[order]
    weight = np.ones(len(order), dtype=np.int64) if weights is None else weights[order].astype(np.int64)
    before = np.concatenate([[0], np.cumsum(weight)])  # before[j]: weight of sorted rows < j
    group_start = np.searchsorted(sorted_keys, sorted_keys, side="left")
    # rows of the same key with time < t = those from the key's first row to the first row of (key, t)
    new_run = np.ones(len(order), dtype=bool)
    new_run[1:] = (sorted_keys[1:] != sorted_keys[:-1]) | (sorted_times[1:] != sorted_times[:-1])
    first_same_time = np.flatnonzero(new_run)[np.cumsum(new_run) - 1]
    counts = np.empty(len(order), dtype=np.int64)
    counts[order] = before[first_same_time] - before[group_start]
    return counts


def _user_runs(user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by user -> (each row's position in its user's rows, its user's row count,
    each user's first row, each row's user index)."""
    n = len(user)
    user_change = np.ones(n, dtype=bool)
    user_change[1:] = user[1:] != user[:-1]
    user_first_row = np.flatnonzero(user_change)
    user_index = np.cumsum(user_change) - 1
    position = np.arange(n) - user_first_row[user_index]
    return position, np.diff(np.append(user_first_row, n))[user_index], user_first_row, user_index


def split_parts(frame: pd.DataFrame, schema: DatasetSchema, split: SplitRule = SplitRule()) -> np.ndarray:
    """The split part of every row of ``frame`` (its user, timestamp and split columns suffice),
    as build_examples assigns them, in the frame's (user, timestamp) stable order."""
    frame = frame.sort_values([schema.user, schema.timestamp], kind="stable").reset_index(drop=True)
    position, user_length, _, _ = _user_runs(pd.factorize(frame[schema.user])[0])
    return _split(frame, schema, split, frame[schema.timestamp].to_numpy(dtype=np.int64), position, user_length)


def _split(frame: pd.DataFrame, schema: DatasetSchema, rule: SplitRule, timestamp: np.ndarray,
           position: np.ndarray, user_length: np.ndarray) -> np.ndarray:
    if schema.split:
        names = frame[schema.split].astype(str).str.lower()
        unknown = sorted(set(names) - set(SPLIT_NAMES))
        if unknown:
            raise DataError(f"column '{schema.split}' has split value(s) {unknown}; use train, valid, test, context")
        return names.map(SPLIT_NAMES).to_numpy(dtype=np.int8)
    if rule.kind == "time":
        valid_from, test_from = rule.time_cuts(timestamp)
        return np.where(timestamp >= test_from, TEST, np.where(timestamp >= valid_from, VALID, TRAIN)).astype(np.int8)
    from_end = user_length - position  # 1 for the user's last interaction
    return np.where(from_end <= rule.last_n, TEST, np.where(from_end <= 2 * rule.last_n, VALID, TRAIN)).astype(np.int8)


def labels_of(frame: pd.DataFrame, schema: DatasetSchema) -> np.ndarray:
    """The 0/1 label of every row: its label column, or its rating against the threshold."""
    if schema.label:
        column = frame[schema.label]
        if column.isna().any():
            raise DataError(f"column '{schema.label}' (the label) has missing values")
        label = column.to_numpy(dtype=np.float32)
        if not np.isin(label, (0.0, 1.0)).all():
            raise DataError(f"column '{schema.label}' must hold 0/1 labels")
        return label
    rating = pd.to_numeric(frame[schema.rating], errors="coerce")
    if rating.isna().any():
        raise DataError(f"column '{schema.rating}' (the rating) has missing or non-numeric values")
    return (rating.to_numpy(dtype=np.float64) >= schema.rating_threshold).astype(np.float32)


def category_ids(column: pd.Series) -> np.ndarray:
    """One category id per row: the value, a list's first value, NO_CATEGORY where missing."""
    lists = column.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any()
    values, offsets = _multi_raw_ids(column, None) if lists else _raw_ids(column)
    present = np.diff(offsets) > 0
    out = np.full(len(column), NO_CATEGORY, dtype=np.int64)
    out[present] = values[offsets[:-1][present]]
    return out


def build_examples(frame: pd.DataFrame, schema: DatasetSchema, split: SplitRule = SplitRule()) -> Examples:
    """All examples of an interactions frame (profiles joined on: DatasetTables.joined), split
    and with histories."""
    check_columns(frame, schema.required_columns(), "the data")
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

    position, user_length, user_first_row, user_index = _user_runs(user_raw)
    split_part = _split(frame, schema, split, timestamp, position, user_length)
    label = labels_of(frame, schema)

    values, offsets, numeric = _row_features(frame, schema, user_raw, item_raw)
    sequence_categories = None
    # behaviours: the rows that enter histories and counters
    behaviour = np.ones(n, dtype=bool) if schema.history == "all" else label == 1
    behaviours_before_row = np.concatenate([[0], np.cumsum(behaviour)])
    sequence_start = behaviours_before_row[user_first_row[user_index]]
    history_length = _count_strictly_before(user_raw, timestamp, behaviour)
    if schema.category:
        sequence_categories = values[CATEGORY_FEATURE][behaviour]
    dense_columns = [np.log1p(history_length).astype(np.float32),
                     np.log1p(_count_strictly_before(item_raw, timestamp, behaviour)).astype(np.float32)]
    dense_columns += numeric

    examples = Examples(
        feature_values=values, feature_offsets=offsets,
        dense=np.stack(dense_columns, axis=1), dense_names=DERIVED_DENSE + list(schema.numeric),
        label=label, user_id=user_raw, item_id=item_raw, timestamp=timestamp, split=split_part,
        sequence_items=item_raw[behaviour], sequence_timestamps=timestamp[behaviour],
        sequence_categories=sequence_categories,
        sequence_start=sequence_start.astype(np.int64), position=position.astype(np.int64),
        history_length=history_length, schema=schema,
    )
    if schema.implicit:
        examples = _with_sampled_negatives(examples, frame, schema, behaviour)
    return examples


def _row_features(frame: pd.DataFrame, schema: DatasetSchema, user_raw: np.ndarray,
                  item_raw: np.ndarray) -> tuple[dict, dict, list[np.ndarray]]:
    """Every row's categorical features (raw ids: values and offsets per feature, the category
    included) and its numeric features as the tower reads them."""
    n = len(frame)
    values, offsets = {"user_id": user_raw, "item_id": item_raw}, {}
    offsets["user_id"] = offsets["item_id"] = np.arange(n + 1, dtype=np.int64)
    for column in schema.categorical:
        values[column], offsets[column] = _raw_ids(frame[column])
    for column, separator in schema.multi_valued.items():
        values[column], offsets[column] = _multi_raw_ids(frame[column], separator)
    if schema.category:
        if schema.category in values:  # a declared feature: its (first) value, as the feature has it
            bags = np.diff(offsets[schema.category]) > 0
            row_category = np.full(n, NO_CATEGORY, dtype=np.int64)
            row_category[bags] = values[schema.category][offsets[schema.category][:-1][bags]]
        else:
            row_category = category_ids(frame[schema.category])
        values[CATEGORY_FEATURE] = row_category
        offsets[CATEGORY_FEATURE] = np.arange(n + 1, dtype=np.int64)
    return values, offsets, [numeric_values(frame[column], column) for column in schema.numeric]


def _with_sampled_negatives(examples: Examples, frame: pd.DataFrame, schema: DatasetSchema,
                            behaviour: np.ndarray) -> Examples:
    """The direct loader's sampled negatives (features/negatives.py): each a copy of its positive's
    row (user, instant, user and context columns) with the drawn item's columns."""
    rule = ImplicitRule.of(schema.implicit)
    positive = np.flatnonzero((examples.label == 1) & (examples.split != CONTEXT))
    items, times = catalogue(examples.user_id[behaviour], examples.item_id[behaviour],
                             examples.timestamp[behaviour], rule.sampler)
    draws = sample_negatives(rule, examples.user_id[positive], examples.item_id[positive],
                             examples.timestamp[positive], items, times,
                             examples.user_id, examples.item_id, examples.timestamp)
    if draws.dropped:
        log.info("implicit feedback: %d of %d negatives dropped (every draw was an item the user had met)",
                 draws.dropped, len(positive) * rule.negatives)
    parent = positive[draws.positive]
    # the drawn item's columns from one of its rows (its profile, joined onto every row of the item)
    others = {*schema.users.columns, *schema.context.columns}
    item_columns = [c for c in dict.fromkeys([schema.item, *schema.items.columns, schema.category])
                    if c is not None and c not in others]
    distinct, last_row = np.unique(examples.item_id[::-1], return_index=True)
    row_of_item = len(examples.item_id) - 1 - last_row
    item_rows = row_of_item[np.searchsorted(distinct, draws.item)]
    rows = frame.iloc[parent].reset_index(drop=True)
    drawn = frame.iloc[item_rows].reset_index(drop=True)
    for column in item_columns:
        rows[column] = drawn[column]
    values, offsets, numeric = _row_features(rows, schema, examples.user_id[parent], draws.item)
    # the drawn item's behaviours strictly before the instant: counted among every behaviour
    keys = np.concatenate([examples.item_id[behaviour], draws.item])
    stamps = np.concatenate([examples.timestamp[behaviour], examples.timestamp[parent]])
    weights = np.concatenate([np.ones(int(behaviour.sum()), dtype=np.int64), np.zeros(len(parent), dtype=np.int64)])
    item_count = _count_strictly_before(keys, stamps, weights)[int(behaviour.sum()):]
    dense = np.stack([examples.dense[parent, 0], np.log1p(item_count).astype(np.float32), *numeric], axis=1)
    return append_negatives(examples, parent, draws.k, values, offsets, dense, draws.item, rule.negatives)


def append_negatives(examples: Examples, parent: np.ndarray, k: np.ndarray, values: dict, offsets: dict,
                     dense: np.ndarray, item_id: np.ndarray, per_positive: int) -> Examples:
    """``examples`` with negatives, each right after its positive ``parent`` (in k order), of its
    split part, with its history and user counter; ``values`` / ``offsets`` / ``dense``: the
    negatives' features."""
    n = len(examples)
    key = np.concatenate([np.arange(n, dtype=np.int64) * (per_positive + 1), parent * (per_positive + 1) + k + 1])
    order = np.argsort(key, kind="stable")
    new_values, new_offsets = {}, {}
    for name in examples.feature_values:
        joined_values = np.concatenate([examples.feature_values[name], values[name]])
        base = examples.feature_offsets[name]
        joined_offsets = np.concatenate([base, base[-1] + offsets[name][1:]])
        new_values[name], new_offsets[name] = take_jagged(joined_values, joined_offsets, order)

    def both(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
        return np.concatenate([mine, theirs.astype(mine.dtype, copy=False)])[order]

    return dataclasses.replace(
        examples, feature_values=new_values, feature_offsets=new_offsets,
        dense=both(examples.dense, dense.reshape(len(parent), examples.dense.shape[1])),
        label=both(examples.label, np.zeros(len(parent), dtype=np.float32)),
        user_id=both(examples.user_id, examples.user_id[parent]), item_id=both(examples.item_id, item_id),
        timestamp=both(examples.timestamp, examples.timestamp[parent]),
        split=both(examples.split, examples.split[parent]),
        sequence_start=both(examples.sequence_start, examples.sequence_start[parent]),
        position=both(examples.position, examples.position[parent]),
        history_length=both(examples.history_length, examples.history_length[parent]))


# --- feature-store rows -> Examples (training's point-in-time join, serving's online read) ---


def feature_row_schema(schema: DatasetSchema) -> DatasetSchema:
    """The schema of feature rows: canonical id, time and category columns, the same features."""
    def inline(group: FeatureGroup) -> FeatureGroup:
        return dataclasses.replace(group, path=None, id=None, title=None)

    return dataclasses.replace(schema, user="user_id", item="item_id", timestamp="timestamp", path="",
                               format="table", users=inline(schema.users), items=inline(schema.items),
                               category=CATEGORY_FEATURE if schema.category else None,
                               implicit=None)  # feature rows hold their negatives already (or none: serving)


def _arrays(column: pd.Series) -> list[np.ndarray]:
    return [np.asarray(v if isinstance(v, (list, np.ndarray)) else [], dtype=np.int64) for v in column]


def category_id(text) -> int:
    return NO_CATEGORY if text is None or text != text else value_to_id(text)


def examples_from_feature_rows(rows: pd.DataFrame, schema: DatasetSchema, *, split: SplitRule = SplitRule(),
                               item_categories: dict[int, object] | None = None) -> Examples:
    """Examples whose features, counters and histories are the rows' (not recomputed from them).

    A history item's category comes from ``item_categories`` (item id -> category text) or,
    failing that, from a row of the same item; an item known to neither has NO_CATEGORY.
    """
    examples = build_examples(rows, feature_row_schema(schema), split)
    # build_examples sorts by (user, time) with a stable sort: reorder the rows the same way
    rows = rows.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)

    def counts(column: str) -> np.ndarray:
        return rows[column].fillna(0).to_numpy(dtype=np.int64)

    examples.dense[:, 0] = np.log1p(counts("user_interaction_count")).astype(np.float32)
    examples.dense[:, 1] = np.log1p(counts("item_interaction_count")).astype(np.float32)

    histories = _arrays(rows["history_item_ids"])
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    examples.sequence_items = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    if schema.category:
        category_of = dict(zip(rows["item_id"].to_numpy(np.int64), rows[CATEGORY_FEATURE]))
        category_of.update(item_categories or {})
        # once per distinct item, not per history entry (histories repeat items across rows)
        distinct, position = np.unique(examples.sequence_items, return_inverse=True)
        ids = np.fromiter((category_id(category_of.get(i)) for i in distinct), dtype=np.int64, count=len(distinct))
        examples.sequence_categories = ids[position.reshape(-1)]
    stamps = _arrays(rows["history_timestamps"])
    examples.sequence_timestamps = np.concatenate(stamps) if stamps else np.zeros(0, dtype=np.int64)
    examples.sequence_start = offsets[:-1]
    examples.history_length = lengths
    examples.schema = schema
    return examples
