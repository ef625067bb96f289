"""Training examples from the offline store: point-in-time joins at each label event.

Every interaction becomes an entity row (user, item, time); Feast joins the
latest feature row at or before ``time - 1 microsecond``, i.e. what was known
strictly before the event's second. The result is the same Examples the direct
loader builds (tests/test_feature_store.py checks it on ML-100K): labels and the
temporal split from the events, categorical features from the profiles, the
history and counters from the stream-maintained views.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.store import data_dir
from recsys.data.examples import Examples, build_examples, value_to_id
from recsys.data.movielens import MOVIELENS_SCHEMA

STRICTLY_BEFORE = pd.Timedelta(microseconds=1)


def historical_frame(store, directory=None) -> pd.DataFrame:
    """The label events joined point-in-time with the ``ranker`` feature service."""
    events = pd.read_parquet(data_dir(directory) / "offline" / "interactions.parquet")
    entity_rows = events.assign(
        event_timestamp=pd.to_datetime(events["timestamp"], unit="s", utc=True) - STRICTLY_BEFORE,
        row=np.arange(len(events)))
    joined = store.get_historical_features(entity_df=entity_rows, full_feature_names=True,
                                           features=store.get_feature_service("ranker")).to_df()
    # "view__feature" -> "feature"; the two counters keep their view in the name
    joined = joined.rename(columns={"user_history__interaction_count": "user_interaction_count",
                                    "item_counters__interaction_count": "item_interaction_count"})
    joined = joined.rename(columns=lambda c: c.split("__", 1)[1] if "__" in c else c)
    return joined.sort_values("row").reset_index(drop=True)


def examples_from_store(store, directory=None, *, label_threshold: float = 4.0, eval_last_n: int = 5) -> Examples:
    joined = historical_frame(store, directory)
    joined["release_year"] = joined["release_year"].astype("Int64")
    examples = build_examples(joined, MOVIELENS_SCHEMA, label_threshold=label_threshold, eval_last_n=eval_last_n)
    # build_examples sorts by (user, time) with a stable sort: the same order as `joined`'s per user
    order = joined.sort_values(["user_id", "timestamp"], kind="stable").index.to_numpy()
    joined = joined.loc[order].reset_index(drop=True)

    def counts(column: str) -> np.ndarray:
        return joined[column].fillna(0).to_numpy(dtype=np.int64)

    examples.dense[:, 0] = np.log1p(counts("user_interaction_count")).astype(np.float32)
    examples.dense[:, 1] = np.log1p(counts("item_interaction_count")).astype(np.float32)

    histories = [np.asarray(h if isinstance(h, (list, np.ndarray)) else [], dtype=np.int64)
                 for h in joined["history_item_ids"]]
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    examples.sequence_items = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    category_of = dict(zip(joined["item_id"].to_numpy(np.int64),
                           (value_to_id(c) for c in joined["category"])))
    examples.sequence_categories = np.fromiter((category_of[i] for i in examples.sequence_items),
                                               dtype=np.int64, count=len(examples.sequence_items))
    examples.sequence_timestamps = np.concatenate(
        [np.asarray(t if isinstance(t, (list, np.ndarray)) else [], dtype=np.int64)
         for t in joined["history_timestamps"]]) if histories else np.zeros(0, dtype=np.int64)
    examples.sequence_start = offsets[:-1]
    examples.history_length = lengths
    return examples
