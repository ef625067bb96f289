"""Training examples from the offline store: point-in-time joins at each label event.

Every interaction becomes an entity row (user, item, time); Feast joins the
latest feature row at or before ``time - 1 microsecond``, i.e. what was known
strictly before the event's second. The result is the same Examples the direct
loader builds (tests/test_feature_store.py checks it on ML-100K): labels and the
temporal split from the events, categorical features from the profiles, the
history and counters from the stream-maintained views (features/examples.py turns
the joined rows into Examples, the same code serving uses).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.store import data_dir
from features.examples import examples_from_feature_rows
from recsys.data.examples import Examples

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
    return examples_from_feature_rows(historical_frame(store, directory), label_threshold=label_threshold,
                                      eval_last_n=eval_last_n)
