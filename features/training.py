"""Training examples from the offline store: point-in-time joins at each label event.

Every interaction becomes an entity row (user, item, time); Feast joins the
latest feature row at or before ``time - 1 microsecond``, i.e. what was known
strictly before the event's instant (timestamps are seconds or milliseconds,
both coarser than that). The result is the same Examples the direct loader
builds (tests/test_feature_store.py checks it on every shipped schema): labels,
context and the split from the events, categorical features from the profiles,
the history and counters from the stream-maintained views (features/examples.py
turns the joined rows into Examples, the same code serving uses).

The label events are the bulk-loaded ones and those streamed since: ``examples_from_store``
first compacts the ingester's event log, which extends the views with the streamed
behaviours and writes the streamed label events next to the loaded ones
(features/event_log.py), so a training run sees everything ingested so far.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from features.event_log import STREAM_INTERACTIONS, compact_event_log
from features.examples import examples_from_feature_rows
from features.store import data_dir, stored_schema
from recsys.data.examples import Examples, SplitRule
from recsys.known_warnings import feast_calls

log = logging.getLogger("plexrec.features")

STRICTLY_BEFORE = pd.Timedelta(microseconds=1)


def historical_frame(store, directory=None, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """The label events (default: every loaded and compacted one; or ``events``, rows of the same
    columns) joined point-in-time with the ``ranker`` feature service.

    Feast's DuckDB join pairs every label event with every feature row of its user before
    keeping the latest: its cost grows with the square of the rows per user (measured: ML-100K's
    80k ratings with 200-long histories in 15 s), so rows a schema marks "context" are left out."""
    schema = stored_schema(directory)
    offline = data_dir(directory) / "offline"
    if events is None:
        events = pd.read_parquet(offline / "interactions.parquet")
        if (offline / STREAM_INTERACTIONS).exists():  # the label events streamed since the load, if compacted
            events = pd.concat([events, pd.read_parquet(offline / STREAM_INTERACTIONS)], ignore_index=True)
    if schema.split:  # history-only rows are never examples: joining them would only cost time
        events = events[events[schema.split].astype(str).str.lower() != "context"]
    entity_rows = events.assign(
        event_timestamp=pd.to_datetime(events["timestamp"], unit=schema.timestamp_unit, utc=True) - STRICTLY_BEFORE,
        row=np.arange(len(events)))
    with feast_calls():
        joined = store.get_historical_features(entity_df=entity_rows, full_feature_names=True,
                                               features=store.get_feature_service("ranker")).to_df()
    # "view__feature" -> "feature"; the two counters keep their view in the name
    joined = joined.rename(columns={"user_history__interaction_count": "user_interaction_count",
                                    "item_counters__interaction_count": "item_interaction_count"})
    joined = joined.rename(columns=lambda c: c.split("__", 1)[1] if "__" in c else c)
    return joined.sort_values("row").reset_index(drop=True)


def examples_from_store(store, directory=None, *, split: SplitRule = SplitRule(), compact: bool = True,
                        events: pd.DataFrame | None = None) -> Examples:
    """Examples of every label event, loaded or streamed (``compact``: compact the event log first;
    without it, the events of the last compaction), or of ``events`` alone (interaction rows, e.g.
    features.event_log.events_after: the caller has compacted); history items take their category
    from the item profiles."""
    if compact and events is None:
        log.info("event log: %s", compact_event_log(data_dir(directory)).summary())
    schema = stored_schema(directory)
    categories = None
    if schema.category:
        items = pd.read_parquet(data_dir(directory) / "offline" / "item_profile.parquet",
                                columns=["item_id", "item_category"])
        categories = dict(zip(items["item_id"].to_numpy(np.int64), items["item_category"]))
    return examples_from_feature_rows(historical_frame(store, directory, events), schema, split=split,
                                      item_categories=categories)
