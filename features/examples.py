"""Feature-store rows -> model Examples: the one conversion training and serving share.

A "feature row" frame has one row per (user, item, time) with the columns the
``ranker`` feature service returns: the user's and the item's profile columns,
``history_item_ids`` / ``history_timestamps`` (oldest first), the two counters
``user_interaction_count`` / ``item_interaction_count``, and a ``rating``.
Training gets these rows from a point-in-time join (features/training.py),
serving from the online store (serving/features.py); both call
``examples_from_feature_rows``, so the model inputs cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys.data.examples import Examples, build_examples, value_to_id
from recsys.data.movielens import MOVIELENS_SCHEMA

USER_PROFILE_COLUMNS = ["age_bucket", "gender", "occupation", "zip_prefix"]
ITEM_PROFILE_COLUMNS = ["genres", "release_year", "category"]


def _arrays(column: pd.Series) -> list[np.ndarray]:
    return [np.asarray(v if isinstance(v, (list, np.ndarray)) else [], dtype=np.int64) for v in column]


def examples_from_feature_rows(rows: pd.DataFrame, *, label_threshold: float = 4.0, eval_last_n: int = 5,
                               item_categories: dict[int, object] | None = None) -> Examples:
    """Examples whose features, counters and histories are the rows' (not recomputed from them).

    A history item's category comes from ``item_categories`` (item id -> category value) or,
    failing that, from a row of the same item.
    """
    rows = rows.assign(release_year=rows["release_year"].astype("Int64"))
    examples = build_examples(rows, MOVIELENS_SCHEMA, label_threshold=label_threshold, eval_last_n=eval_last_n)
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
    category_of = dict(zip(rows["item_id"].to_numpy(np.int64), rows["category"]))
    category_of.update(item_categories or {})
    # once per distinct item, not per history entry (histories repeat items across rows)
    distinct, position = np.unique(examples.sequence_items, return_inverse=True)
    category_ids = np.fromiter((value_to_id(category_of[i]) for i in distinct), dtype=np.int64, count=len(distinct))
    examples.sequence_categories = category_ids[position.reshape(-1)]
    stamps = _arrays(rows["history_timestamps"])
    examples.sequence_timestamps = np.concatenate(stamps) if stamps else np.zeros(0, dtype=np.int64)
    examples.sequence_start = offsets[:-1]
    examples.history_length = lengths
    return examples
