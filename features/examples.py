"""Feature-store rows -> model Examples: the one conversion training and serving share.

A "feature row" frame has one row per (user, item, time) with the columns the
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

import numpy as np
import pandas as pd

from recsys.data.examples import NO_CATEGORY, Examples, SplitRule, build_examples, value_to_id
from recsys.data.schema import CATEGORY_FEATURE, DatasetSchema, FeatureGroup


def feature_row_schema(schema: DatasetSchema) -> DatasetSchema:
    """The schema of feature rows: canonical id, time and category columns, the same features."""
    def inline(group: FeatureGroup) -> FeatureGroup:
        return dataclasses.replace(group, path=None, id=None, title=None)

    return dataclasses.replace(schema, user="user_id", item="item_id", timestamp="timestamp", path="",
                               format="table", users=inline(schema.users), items=inline(schema.items),
                               category=CATEGORY_FEATURE if schema.category else None)


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
