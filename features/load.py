"""A data set -> the feature store: offline Parquet tables, then the online store.

    plexrec features load [--schema data/kuairand-pure/schema.yaml] [--data-dir .plexrec]

Tables (one per feature view of features/repo/definitions.py, which builds the
views from the same schema):

    user_profile   one row per user: the schema's ``users`` columns, stamped at the epoch
    item_profile   one row per item: the ``items`` columns and the item's category (as text)
    user_history   one row per user, its latest state: the last ``history_length``
                   behaviours, their timestamps, and the behaviour count
    item_counters  one row per item: its behaviour count
    interactions   the label events themselves (not a feature view): ids, timestamp,
                   label or rating, context columns; what training joins the features to

A *behaviour* is a row that enters histories: every row, or the positive ones
(the schema's ``history``). Timestamps keep the schema's unit. Next to the tables,
``store.json`` records the schema, its fingerprint, the history length and the
Feast type of every column: the definitions, the ingester and the server read it.
Then the registry is applied and the latest value of every view is materialised
into the online store.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from features.columns import feast_type, microseconds, stored_column
from features.durable import write_parquet, write_text
from features.event_log import (PROFILE_ORDER, compact_event_log, compaction_lock, stream_item_profile_parts,
                                stream_parts)
from features.schema import DataError, DatasetSchema, first_value
from features.tables import DatasetTables
from features.known_warnings import feast_calls
from features.examples import labels_of  # the label rule, as training applies it
from features.log_stamp import foreign_log_files
from features.store import STORE_LAYOUT, apply_definitions, read_store_meta

log = logging.getLogger("plexrec.features")

EPOCH = pd.Timestamp(0, unit="s", tz="UTC")
STORE_META = "store.json"


def running_state(keys: np.ndarray, times: np.ndarray, items: np.ndarray | None,
                  history_length: int, unit: str = "s", latest_only: bool = False) -> pd.DataFrame:
    """One row per (key, instant): behaviours up to it, and (with ``items``) the last
    ``history_length`` of them, oldest first; ``latest_only``: one row per key, its last instant's.
    Rows of one key must be in time order."""
    n = len(keys)
    last_of_instant = np.ones(n, dtype=bool)
    last_of_instant[:-1] = (keys[1:] != keys[:-1]) | ((times[1:] != times[:-1]) & (not latest_only))
    key_start = np.searchsorted(keys, keys, side="left") if n else keys
    ends = np.flatnonzero(last_of_instant) + 1  # exclusive end of each state, in the key's sequence
    starts = key_start[ends - 1]
    state = pd.DataFrame({"key": keys[ends - 1],
                          "event_timestamp": pd.to_datetime(times[ends - 1], unit=unit, utc=True),
                          "interaction_count": (ends - starts).astype(np.int64)})
    if items is not None:
        first = np.maximum(starts, ends - history_length)
        state["history_item_ids"] = [items[a:b].tolist() for a, b in zip(first, ends)]
        state["history_timestamps"] = [times[a:b].tolist() for a, b in zip(first, ends)]
    return state


def column_types(schema: DatasetSchema, tables: DatasetTables) -> dict[str, str]:
    types = {}
    for group_name, table in (("users", tables.users), ("items", tables.items), ("context", tables.interactions)):
        group = getattr(schema, group_name)
        for column in [*group.categorical, *group.multi_valued]:
            types[column] = feast_type(table[column], "categorical")
        for column in group.numeric:
            types[column] = "Float32"
    return types


def item_categories(schema: DatasetSchema, items: pd.DataFrame) -> pd.Series:
    """Each item's category as text (a list's or a multi-valued string's first value)."""
    if not schema.category:
        return pd.Series([None] * len(items), index=items.index, dtype=object)
    separator = schema.multi_valued.get(schema.category)
    return items[schema.category].map(lambda cell: first_value(cell, separator)).astype(object)


def offline_tables(tables: DatasetTables, history_length: int, types: dict[str, str] | None = None,
                   stream: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The Parquet tables of every feature view, from a data set's tables (profiles from its
    users and items tables: a catalogue may be wider than the interactions); ``types``: the
    columns' Feast types (column_types), computed here when not given; ``stream``: interaction
    rows streamed into the store since an earlier load, whose behaviours the views keep (those
    that are rows of the data set count once)."""
    schema = tables.schema
    types = types or column_types(schema, tables)
    users = tables.users.rename(columns={schema.user: "user_id"})[["user_id", *schema.users.columns]].copy()
    items_source = tables.items.rename(columns={schema.item: "item_id"})
    items = items_source[["item_id", *schema.items.columns]].copy()
    for table, group in ((users, schema.users), (items, schema.items)):
        for column in group.columns:
            table[column] = stored_column(table[column], types[column])
        table["event_timestamp"] = EPOCH
    items["item_category"] = item_categories(schema, items_source).to_numpy()

    frame = tables.joined().rename(columns={schema.user: "user_id", schema.item: "item_id",
                                            schema.timestamp: "timestamp"})
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    history, counters = behaviour_views(with_stream(frame, stream, schema), schema, history_length)
    label_column = schema.rating or schema.label
    interactions = frame[["user_id", "item_id", "timestamp", label_column,
                          *[c for c in (schema.split,) if c]]].copy()
    for column in schema.context.columns:
        interactions[column] = stored_column(frame[column], types[column])
    return {"user_profile": users, "item_profile": items, "user_history": history,
            "item_counters": counters, "interactions": interactions}


def with_stream(frame: pd.DataFrame, stream: pd.DataFrame | None, schema: DatasetSchema) -> pd.DataFrame:
    """The loaded rows and the streamed ones that are not loaded rows, by user and time (the loaded
    first among equal times: the order the examples give them, features/example_tables.py)."""
    if stream is None or not len(stream):
        return frame
    columns = ["user_id", "item_id", "timestamp", schema.rating or schema.label]
    key = ["user_id", "item_id", "timestamp"]
    replayed = pd.MultiIndex.from_frame(stream[key]).isin(pd.MultiIndex.from_frame(frame[key]))
    both = pd.concat([frame[columns], stream.loc[~replayed, columns]], ignore_index=True)
    return both.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


def committed_stream(directory: Path, schema: DatasetSchema) -> pd.DataFrame | None:
    """The interaction rows streamed into the store in ``directory`` (compacted first), when it holds
    ``schema``'s data set; None for a new store or another data set's."""
    if not (directory / STORE_META).is_file() or read_store_meta(directory).get("schema_fingerprint") != \
            schema.fingerprint():
        return None
    log.info("event log before the load: %s", compact_event_log(directory).summary())
    parts = [pd.read_parquet(path) for path in stream_parts(directory)]
    return pd.concat(parts, ignore_index=True) if parts else None


def carry_stream_state(store, history: pd.DataFrame, counters: pd.DataFrame) -> None:
    """Rows the ingester has written online keep its watermarks and event-id windows (so a
    re-delivered event still changes nothing), and are stamped after them (Feast's Redis store
    drops a write stamped at or before the stored one)."""
    views = ((history, "user_id", "user_history", ["ingest_source", "ingest_offset"]),
             (counters, "item_id", "item_counters", ["ingest_topic", "ingest_offsets"]))
    for table, key, view, marks in views:
        if not len(table):
            continue
        with feast_calls():
            online = store.get_online_features(
                features=[f"{view}:{c}" for c in (*marks, "recent_event_ids", "stamp_us")],
                entity_rows=[{key: int(k)} for k in table[key]]).to_dict()
        stamped = np.array([s is not None for s in online["stamp_us"]])
        if not stamped.any():
            continue
        for column in (*marks, "recent_event_ids"):
            values = pd.Series(online[column], index=table.index, dtype=object)
            table[column] = table[column].astype(object).where(~stamped, values)
        if "ingest_offset" in marks:
            table["ingest_offset"] = table["ingest_offset"].astype("int64")
        previous = np.array([s if s is not None else -1 for s in online["stamp_us"]], dtype=np.int64)
        table["stamp_us"] = np.maximum(table["stamp_us"].to_numpy(np.int64), previous + 1)
        table["event_timestamp"] = pd.to_datetime(table["stamp_us"], unit="us", utc=True)


def behaviour_views(frame: pd.DataFrame, schema: DatasetSchema,
                    history_length: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The user_history and item_counters tables of interactions in the store's columns (user_id,
    item_id, timestamp in the schema's unit, the label or rating column), sorted by user and time
    (a stable sort: among equal times, the order behaviours entered): one row per user and per item,
    its latest state, which is what ``materialize`` copies into the online store. Training never
    joins these views (features/example_tables.py computes every example's state from the events),
    so no per-behaviour snapshot is kept: that was O(behaviours x history length) on disk and
    quadratic per user in Feast's point-in-time join."""
    unit = schema.timestamp_unit
    label = labels_of(frame, schema)
    behaviours = frame[label == 1] if schema.history == "positive" else frame
    times = behaviours["timestamp"].to_numpy(dtype=np.int64)
    history = running_state(behaviours["user_id"].to_numpy(np.int64), times,
                            behaviours["item_id"].to_numpy(np.int64), history_length, unit, latest_only=True)
    history = history.rename(columns={"key": "user_id"})
    # the offline views carry no stream watermarks: those are the online rows' (features/ingest.py)
    history["ingest_source"], history["ingest_offset"] = "", -1
    history["recent_event_ids"] = b""
    history["stamp_us"] = microseconds(history["event_timestamp"])
    by_item = behaviours.sort_values(["item_id", "timestamp"], kind="stable")
    counters = running_state(by_item["item_id"].to_numpy(np.int64), by_item["timestamp"].to_numpy(np.int64),
                             None, history_length, unit, latest_only=True).rename(columns={"key": "item_id"})
    counters["ingest_topic"] = ""
    counters["ingest_offsets"] = [np.zeros(0, dtype=np.int64) for _ in range(len(counters))]  # typed: list<int64>
    counters["recent_event_ids"] = b""
    counters["stamp_us"] = microseconds(counters["event_timestamp"])
    return history, counters


def store_meta(schema: DatasetSchema, types: dict[str, str], history_length: int) -> dict:
    return {"schema": schema.to_dict(), "schema_fingerprint": schema.fingerprint(), "layout": STORE_LAYOUT,
            "history_length": history_length, "types": types,
            "loaded_at": datetime.now(timezone.utc).isoformat()}


def archive_foreign_stream(directory: Path) -> Path | None:
    """Move the event log and its training rows away when they were streamed into a store of another
    schema (features/log_stamp.py): they would become the new data set's examples. Where they went."""
    foreign = foreign_log_files(directory, unstamped_foreign=False)
    if not foreign:
        return None
    archive = directory / f"archived-stream-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    archive.mkdir()
    for name in ("events", "stream_interactions", "stream_item_profile"):
        if (directory / "offline" / name).exists():
            (directory / "offline" / name).rename(archive / name)
    log.warning("the event log in %s was streamed into a store of another schema (%d file(s)): moved to %s",
                directory / "offline" / "events", len(foreign), archive)
    return archive


def load_into_store(store, tables: DatasetTables, directory: Path, history_length: int) -> dict[str, int]:
    """Write the offline tables and store.json, apply the definitions, materialise the online store."""
    if tables.interactions.empty:
        raise DataError("the interactions are empty: nothing to load")
    types = column_types(tables.schema, tables)
    directory = Path(directory)
    stream = committed_stream(directory, tables.schema)  # a reload keeps what was streamed since
    offline_data = offline_tables(tables, history_length, types, stream)
    offline = directory / "offline"
    offline.mkdir(parents=True, exist_ok=True)
    meta = store_meta(tables.schema, types, history_length)
    if stream is not None:
        apply_definitions(store, directory)  # the registry of the store as it is: read its online rows
        carry_stream_state(store, offline_data["user_history"], offline_data["item_counters"])
    with compaction_lock(directory):  # a compaction reads these files: it waits, and never sees half of one
        for name, table in offline_data.items():
            write_parquet(table, offline / f"{name}.parquet")
            log.info("wrote %s: %d rows", offline / f"{name}.parquet", len(table))
        write_text(json.dumps(meta, indent=2) + "\n", directory / STORE_META)
        archive_foreign_stream(directory)
    apply_definitions(store, directory)
    last = int(offline_data["interactions"]["timestamp"].max())
    end = max(datetime.fromtimestamp(last / tables.schema.units_per_second + 1, tz=timezone.utc),
              *(offline_data[view]["event_timestamp"].max().to_pydatetime() + timedelta(seconds=1)
                for view in ("user_history", "item_counters") if len(offline_data[view])))
    views = (["user_profile"] if tables.schema.users.columns else []) + ["item_profile", "user_history", "item_counters"]
    with feast_calls():
        store.materialize(start_date=EPOCH.to_pydatetime(), end_date=end, feature_views=views)
    if stream is not None:
        restore_streamed_item_profiles(store, directory)
    return {name: len(table) for name, table in offline_data.items()}


def restore_streamed_item_profiles(store, directory: Path) -> int:
    """Online, every item whose attributes the stream changed gets its newest streamed profile row
    back after a reload's materialize (which writes the loaded rows: SQLite takes them whatever their
    stamp), so the online profile stays the offline one's newest (features/event_log.py). How many."""
    parts = stream_item_profile_parts(directory)
    if not parts:
        return 0
    rows = pd.concat([pd.read_parquet(path) for path in parts], ignore_index=True)
    rows = rows.sort_values(["event_timestamp", PROFILE_ORDER], kind="stable").drop_duplicates("item_id", keep="last")
    rows = rows.drop(columns=PROFILE_ORDER).reset_index(drop=True)
    stamps = pd.to_datetime(rows["event_timestamp"], utc=True)
    frame = rows.drop(columns="event_timestamp").astype(object)
    frame = frame.where(frame.notna(), None)  # object: a missing Int64 / Float32 value stays None
    frame["event_timestamp"] = stamps
    with feast_calls():
        store.write_to_online_store("item_profile", frame)
    return len(frame)
