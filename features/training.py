"""Training examples from the offline store, point in time: what was known strictly before each label event.

The examples are built in SQL from the events themselves (features/example_tables.py): the
user's and the item's behaviours before the event's instant by window functions, its history as
a range of its user's behaviour sequence, the profiles by an as-of join; linear in the rows, with
the engine's memory set by ``EngineSettings``. They are the Examples the direct loader builds
(tests/test_feature_store.py checks it on every shipped schema).

The label events are the bulk-loaded ones and those streamed since: ``examples_from_store``
first compacts the ingester's event log (features/event_log.py), which writes the streamed label
events next to the loaded ones, so a training run sees everything ingested so far.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from features.event_log import compact_event_log
from features.example_sql import EngineSettings, interaction_columns
from features.example_tables import build_example_tables, read_shard
from features.store import data_dir, read_store_meta, stored_schema
from features.examples import Examples, SplitRule
from features.schema import DataError

log = logging.getLogger("plexrec.features")


def examples_from_store(store, directory=None, *, split: SplitRule = SplitRule(), compact: bool = True,
                        events: pd.DataFrame | None = None, settings: EngineSettings = EngineSettings(),
                        engine: str = "duckdb") -> Examples:
    """Examples of every label event, loaded or streamed (``compact``: compact the event log first;
    without it, the events of the last compaction), or of ``events`` alone (interaction rows, e.g.
    features.event_log.events_after: the caller has compacted), built in SQL by
    features/example_tables.py (``engine``: duckdb, or spark); ``store`` is not read (the offline
    Parquet files are), kept for the callers that hold one."""
    directory = data_dir(directory)
    if compact and events is None:
        log.info("event log: %s", compact_event_log(directory).summary())
    schema = stored_schema(directory)
    history_length = int(read_store_meta(directory)["history_length"])
    with tempfile.TemporaryDirectory(prefix="plexrec-examples-") as scratch:
        if events is not None:
            events = events[interaction_columns(schema)]
        tables = build_example_tables(directory / "offline", schema, Path(scratch) / "examples", split=split,
                                      events=events, settings=settings, engine=engine)
        log.info("examples from the store: %s", tables.summary())
        examples = read_shard(tables, 0, schema, split, history_length)
    if examples is None:
        raise DataError(f"the store in {directory} holds no label events to train on")
    return examples
