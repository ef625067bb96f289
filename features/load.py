"""A data set -> the feature store: offline Parquet tables, then the online store.

    plexrec features load [--data-dir .plexrec] [--profile local]

Tables (one per feature view of features/repo/definitions.py):

    user_profile   one row per user, stamped at the epoch (known "forever")
    item_profile   one row per item, likewise
    user_history   one row per (user, second with behaviour): the user's last
                   HISTORY_LENGTH items of seconds <= that second, their timestamps,
                   and the running interaction count
    item_counters  one row per (item, second): the running interaction count
    interactions   the label events themselves (not a feature view): what training
                   joins the features to

Then the registry is applied and the latest value of every view is materialised
into the online store.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.schema import DataError, DatasetSchema

log = logging.getLogger("plexrec.features")

EPOCH = pd.Timestamp(0, unit="s", tz="UTC")
USER_COLUMNS = ["age_bucket", "gender", "occupation", "zip_prefix"]
ITEM_COLUMNS = ["genres", "release_year", "category"]


def _require(frame: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"column '{column}' is required by the feature definitions "
                            f"(features/repo/definitions.py) but missing from the data set")


def _timestamps(seconds: np.ndarray) -> pd.Series:
    return pd.to_datetime(seconds, unit="s", utc=True)


def running_state(keys: np.ndarray, seconds: np.ndarray, items: np.ndarray | None,
                  history_length: int) -> pd.DataFrame:
    """One row per (key, second): interactions of seconds <= it, and (with ``items``) the last
    ``history_length`` of them, oldest first. Rows of one key must be in time order."""
    n = len(keys)
    last_of_second = np.ones(n, dtype=bool)
    last_of_second[:-1] = (keys[1:] != keys[:-1]) | (seconds[1:] != seconds[:-1])
    key_start = np.searchsorted(keys, keys, side="left") if n else keys
    ends = np.flatnonzero(last_of_second) + 1  # exclusive end of each state, in the key's sequence
    starts = key_start[ends - 1]
    state = pd.DataFrame({"key": keys[ends - 1], "event_timestamp": _timestamps(seconds[ends - 1]),
                          "interaction_count": (ends - starts).astype(np.int64)})
    if items is not None:
        first = np.maximum(starts, ends - history_length)
        state["history_item_ids"] = [items[a:b].tolist() for a, b in zip(first, ends)]
        state["history_timestamps"] = [seconds[a:b].tolist() for a, b in zip(first, ends)]
    return state


def offline_tables(frame: pd.DataFrame, schema: DatasetSchema, history_length: int,
                   catalog: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The Parquet tables of every feature view, from an interactions frame; user and item
    profiles from ``catalog`` when given (rows of the same shape: e.g. the whole data set
    when only its past is loaded, so users and items first seen later still have profiles)."""
    columns = {schema.user: "user_id", schema.item: "item_id", schema.timestamp: "timestamp"}
    for table in (frame, catalog if catalog is not None else frame):
        _require(table, [schema.user, schema.item, schema.timestamp, *USER_COLUMNS, "genres", "release_year"])
    frame = frame.rename(columns=columns)
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    profiles = catalog.rename(columns=columns) if catalog is not None else frame
    users = profiles.drop_duplicates("user_id")[["user_id", *USER_COLUMNS]].copy()
    users["event_timestamp"] = EPOCH
    items = profiles.drop_duplicates("item_id")[["item_id", "genres", "release_year"]].copy()
    items["genres"] = items["genres"].map(list)
    items["category"] = items["genres"].map(lambda g: g[0] if len(g) else None)
    items["release_year"] = items["release_year"].astype("Int64")
    items["event_timestamp"] = EPOCH

    seconds = frame["timestamp"].to_numpy(dtype=np.int64)
    history = running_state(frame["user_id"].to_numpy(np.int64), seconds,
                            frame["item_id"].to_numpy(np.int64), history_length).rename(columns={"key": "user_id"})
    history["ingest_source"], history["ingest_offset"] = "", -1  # loaded in bulk, not from the stream
    by_item = frame.sort_values(["item_id", "timestamp"], kind="stable")
    counters = running_state(by_item["item_id"].to_numpy(np.int64), by_item["timestamp"].to_numpy(np.int64),
                             None, history_length).rename(columns={"key": "item_id"})
    counters["ingest_topic"] = ""
    counters["ingest_offsets"] = [np.zeros(0, dtype=np.int64) for _ in range(len(counters))]  # typed: list<int64>
    interactions = frame[["user_id", "item_id", "timestamp"]].copy()
    interactions["rating"] = frame[schema.rating] if schema.rating else frame[schema.label]
    return {"user_profile": users, "item_profile": items, "user_history": history,
            "item_counters": counters, "interactions": interactions}


def load_into_store(store, frame: pd.DataFrame, schema: DatasetSchema, directory: Path,
                    history_length: int, catalog: pd.DataFrame | None = None) -> dict[str, int]:
    """Write the offline tables, apply the definitions, materialise the online store."""
    from features.store import apply_definitions

    tables = offline_tables(frame, schema, history_length, catalog)
    offline = directory / "offline"
    offline.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_parquet(offline / f"{name}.parquet", index=False)
        log.info("wrote %s: %d rows", offline / f"{name}.parquet", len(table))
    apply_definitions(store, directory)
    end = datetime.fromtimestamp(int(tables["interactions"]["timestamp"].max()) + 1, tz=timezone.utc)
    store.materialize(start_date=EPOCH.to_pydatetime(), end_date=end,
                      feature_views=["user_profile", "item_profile", "user_history", "item_counters"])
    return {name: len(table) for name, table in tables.items()}
