"""The offline event log: what the stream ingester saw, compacted into training data.

    plexrec features compact [--data-dir .plexrec]

The ingester appends every batch it consumes to ``offline/events/batch-*.parquet``
(features/ingest.py, ``Ingester._log``). That log is at-least-once: a re-delivered batch is
logged again, and so is an event its producer sent twice. ``compact_event_log`` makes it
training data, in two steps:

  1. the log: the batch files and the previous compacted log become one file,
     ``offline/events/compacted.parquet``, one row per event id (its first logging) in
     event-time order (stable: among equal times, the order of logging); then the batch
     files it holds are deleted
  2. the views: the logged events become interaction rows in the store's columns
     (``offline/stream_interactions.parquet``: label or rating by the schema's rule, its
     context columns, its timestamp unit), which training joins features to next to the
     bulk-loaded ``offline/interactions.parquet``; and user_history and item_counters are
     rebuilt over bulk + stream (features/load.py ``behaviour_views``, as the load builds
     them), so every row is the state at its instant

Bulk and stream. Compaction never writes interactions.parquet: the load's rows stay as
loaded, and the views are a function of them and of the compacted log alone, rebuilt whole.
A logged event that is a row of the bulk data (the same user, item and instant: a replay of
what was loaded) is neither a second example nor a second behaviour.

Crash safety. Every file is written under a temporary name and renamed over its target
(``os.replace``: a reader sees the whole old file or the whole new one). The log step
replaces compacted.parquet before it deletes a batch file: a kill in between leaves events
in both, and the next compaction's dedupe by event id keeps them once; a kill before the
rename leaves the previous state. ``offline/events/views.json`` records what the views were
built from (the log's digest, the store's load, the files as written), and is written last:
after a kill mid-rebuild it does not match, and the next compaction builds the views again.
So compaction is idempotent, and a kill anywhere leaves a state the next one repairs. One
compaction runs at a time (a lock file: the ranks of a training job may start together);
the ingester may go on writing batch files meanwhile, which the next compaction takes.

Point in time. A view row stamped t holds the behaviours at or before t; training joins as
of just before each label event (features/training.py), so an example sees exactly the
behaviours strictly before it, whether they were loaded or streamed.

No torch on import (the ingester's side of the store); building the views uses
the label rule of recsys.data.examples, which compaction loads when it runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("plexrec.features")

COMPACTED = "compacted.parquet"
BATCH_FILES = "batch-*.parquet"  # the ingester's; its half-written ones end in .tmp
STREAM_INTERACTIONS = "stream_interactions.parquet"
VIEWS_RECORD = "views.json"
LOCK = ".compaction.lock"
STREAM_SPLIT = "train"  # a schema's split column describes the bulk rows; streamed ones are new training data
READ_ATTEMPTS = 10
LOADED_KEY = ["user_id", "item_id", "timestamp"]  # a logged event with these of a loaded row is that row


def log_dir(directory: str | Path) -> Path:
    return Path(directory) / "offline" / "events"


def read_event_log(directory: str | Path) -> pd.DataFrame:
    """The offline event log, compacted or not: one row per event id, in event-time order (an empty
    frame when nothing was logged)."""
    events = log_dir(directory)
    for _ in range(READ_ATTEMPTS):
        paths = ([events / COMPACTED] if (events / COMPACTED).is_file() else []) + sorted(events.glob(BATCH_FILES))
        try:
            return merged([pd.read_parquet(path) for path in paths])
        except FileNotFoundError:
            continue  # a compaction folded a batch file into compacted.parquet, then deleted it: list again
    raise RuntimeError(f"the event log in {events} kept changing while it was read ({READ_ATTEMPTS} attempts)")


def merged(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Logged events, earliest logging first -> one row per event id (its first logging), in
    event-time order; a stable sort, so among equal times the order of logging stays."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("event_id", keep="first")
    return frame.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


@dataclass
class Compaction:
    """What one compaction did."""
    batch_files: int = 0  # batch files folded into the compacted log, then deleted
    events_read: int = 0  # their rows
    duplicates: int = 0  # of which event ids the log already held (re-deliveries, producers' retries)
    log_events: int = 0  # events in the compacted log
    stream_interactions: int = 0  # logged events that are training examples
    already_loaded: int = 0  # logged events that are rows of the bulk load (counted once, as loaded)
    views_rebuilt: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.log_events and not self.views_rebuilt:
            return f"no events logged; {self.seconds:.1f} s"
        views = (f"views rebuilt with {self.stream_interactions:,} streamed interactions "
                 f"({self.already_loaded:,} events already loaded in bulk)" if self.views_rebuilt
                 else "views already up to date")
        batches = (f"{self.batch_files} batch files ({self.events_read:,} events, {self.duplicates:,} duplicate "
                   f"event ids dropped) compacted into a log of {self.log_events:,} events" if self.batch_files
                   else f"no new batch files, a log of {self.log_events:,} events")
        return f"{batches}; {views}; {self.seconds:.1f} s"


def compact_event_log(directory: str | Path) -> Compaction:
    """Compact the store's event log and extend the offline views from it (see the module's doc)."""
    directory = Path(directory)
    started = time.perf_counter()
    report = Compaction()
    events = log_dir(directory)
    if events.is_dir():
        with _exclusive(events / LOCK):
            compacted = _compact_log(events, report)
            _extend_views(directory, compacted, report)
    report.seconds = time.perf_counter() - started
    return report


def _compact_log(events: Path, report: Compaction) -> pd.DataFrame:
    path = events / COMPACTED
    previous = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    batches = sorted(events.glob(BATCH_FILES))  # by name: the time each was logged
    if not batches:
        report.log_events = len(previous)
        return previous
    fresh = [pd.read_parquet(batch) for batch in batches]
    report.batch_files, report.events_read = len(batches), sum(len(frame) for frame in fresh)
    compacted = merged([previous, *fresh])
    report.duplicates = len(previous) + report.events_read - len(compacted)
    report.log_events = len(compacted)
    _write(compacted, path)
    for batch in batches:  # only now: every event of theirs is in the compacted log
        batch.unlink(missing_ok=True)
    return compacted


def _extend_views(directory: Path, compacted: pd.DataFrame, report: Compaction) -> None:
    from features.load import behaviour_views
    from features.store import read_store_meta, stored_schema

    offline = directory / "offline"
    meta = read_store_meta(directory)
    digest = _digest(log_dir(directory) / COMPACTED)
    record_path = log_dir(directory) / VIEWS_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record == _basis(offline, meta, digest):
        return
    if record is None and digest is None and not (offline / STREAM_INTERACTIONS).exists():
        return  # nothing was ever streamed: the views are the load's

    schema, history_length = stored_schema(directory), int(meta["history_length"])
    bulk = pd.read_parquet(offline / "interactions.parquet")
    stream = stream_interactions(compacted, schema, meta["types"]) if len(compacted) else bulk.iloc[:0]
    loaded = _rows_of(stream, bulk)
    stream = stream[~loaded].reset_index(drop=True)
    report.already_loaded, report.stream_interactions = int(loaded.sum()), len(stream)
    # bulk rows first: among equal (user, time), the loaded behaviours come before the streamed
    # ones, as the ingester merges them into the online history
    both = pd.concat([bulk, stream], ignore_index=True).sort_values(["user_id", "timestamp"], kind="stable")
    history, counters = behaviour_views(both.reset_index(drop=True), schema, history_length)
    _write(stream, offline / STREAM_INTERACTIONS)
    _write(history, offline / "user_history.parquet")
    _write(counters, offline / "item_counters.parquet")
    _write_text(json.dumps(_basis(offline, meta, digest), indent=2) + "\n", record_path)  # last: see the doc
    report.views_rebuilt = True


def positions(logged: pd.DataFrame) -> pd.Series:
    """Where each logged event was read: ``<topic incarnation>/<partition>`` (a recreated topic, or
    another topic into the same store, counts its offsets from 0 again)."""
    source = logged["source"].astype(str) if "source" in logged else pd.Series("", index=logged.index)
    return source + "/" + logged["partition"].astype(str)


def last_offsets(logged: pd.DataFrame) -> dict[str, int]:
    """Per position (``positions``), the highest offset among ``logged``."""
    if not len(logged):
        return {}
    return {str(k): int(v) for k, v in logged["offset"].groupby(positions(logged)).max().items()}


def events_after(directory: str | Path, offsets: dict[str, int]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The compacted log's label events past ``offsets`` (position -> the last offset taken, see
    ``positions``) as interaction rows in event-time order, without those that are rows of the bulk
    load; and the offsets they reach (a position with nothing new keeps its offset). What a job that
    follows the stream (recsys/learn.py) takes next; call compact_event_log first."""
    from features.store import read_store_meta, stored_schema

    directory = Path(directory)
    path = log_dir(directory) / COMPACTED
    compacted = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if not len(compacted):
        return pd.DataFrame(), dict(offsets)
    taken = positions(compacted).map(lambda position: offsets.get(position, -1)).to_numpy(np.int64)
    new = compacted[compacted["offset"].to_numpy(np.int64) > taken].reset_index(drop=True)
    reached = {**offsets, **last_offsets(new)}
    if not len(new):
        return pd.DataFrame(), reached
    schema = stored_schema(directory)
    rows = stream_interactions(new, schema, read_store_meta(directory)["types"])
    bulk = pd.read_parquet(directory / "offline" / "interactions.parquet", columns=LOADED_KEY)
    rows = rows[~_rows_of(rows, bulk)]
    return rows.sort_values("timestamp", kind="stable").reset_index(drop=True), reached


def _rows_of(rows: pd.DataFrame, bulk: pd.DataFrame) -> np.ndarray:
    """Which of ``rows`` are rows of the bulk load (the same user, item and instant)."""
    return pd.MultiIndex.from_frame(rows[LOADED_KEY]).isin(pd.MultiIndex.from_frame(bulk[LOADED_KEY]))


def stream_interactions(compacted: pd.DataFrame, schema, types: dict[str, str]) -> pd.DataFrame:
    """Logged events as rows of offline/interactions.parquet: user_id, item_id, timestamp in the
    schema's unit, the label or rating column, the split column, the context columns as stored."""
    from features.load import stored_column

    rows = pd.DataFrame({"user_id": compacted["user_id"].to_numpy(np.int64),
                         "item_id": compacted["item_id"].to_numpy(np.int64),
                         "timestamp": event_times(compacted, schema)})
    label = compacted["label"].to_numpy(np.int64)  # the ingester's, by the store's schema (features/events.py)
    if schema.label:
        rows[schema.label] = label
    else:
        rows[schema.rating] = rating_of(compacted["value"], label, schema.rating_threshold)
    if schema.split:
        rows[schema.split] = STREAM_SPLIT
    context = compacted["context"].map(json.loads)
    for column in schema.context.columns:
        values = context.map(lambda entries, column=column: entries.get(column))
        if types[column] == "Int64":  # text a categorical integer column cannot hold is a missing value
            numbers = pd.to_numeric(values, errors="coerce")
            values = numbers.where(numbers == numbers.round())
        rows[column] = stored_column(values, types[column])
    return rows


def event_times(logged: pd.DataFrame, schema) -> np.ndarray:
    """Logged events' times in the schema's unit, as the ingester converts them for the online history."""
    from features.load import microseconds

    return microseconds(logged["event_timestamp"]) // 1000 * schema.units_per_second // 1000


def rating_of(value: pd.Series, label: np.ndarray, threshold: float) -> np.ndarray:
    """The rating column of logged events in a rating schema: each event's rating, or where it has
    none or was labelled against it (an explicit label field wins: features/events.py event_label),
    a rating on the label's side of the threshold, so that training labels it as the ingester did."""
    rating = pd.to_numeric(value, errors="coerce").to_numpy(np.float64)
    agrees = ~np.isnan(rating) & ((rating >= threshold) == (label == 1))
    return np.where(agrees, rating, np.where(label == 1, threshold, threshold - 1))


def _basis(offline: Path, meta: dict, log_digest: str | None) -> dict:
    """What the views are built from and what they are: the log, the load, each file's size and time."""
    files = {}
    for name in ("interactions", "user_history", "item_counters", "stream_interactions"):
        path = offline / f"{name}.parquet"
        files[name] = [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else None
    return {"log": log_digest, "loaded_at": meta.get("loaded_at"), "history_length": meta.get("history_length"),
            "files": files}


def _digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(frame: pd.DataFrame, path: Path) -> None:
    staging = path.with_name(path.name + ".tmp")
    frame.to_parquet(staging, index=False)
    _durably_replace(staging, path)


def _write_text(text: str, path: Path) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    _durably_replace(staging, path)


def _durably_replace(staging: Path, path: Path) -> None:
    """Rename over ``path``, on disk before the caller goes on (it may delete what the file replaces)."""
    with staging.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(staging, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def _exclusive(lock_path: Path):
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, and by the kernel if the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(directory: str | Path | None = None) -> Compaction:
    """`plexrec features compact`: compact the store's event log, extend the views, log what it did."""
    from features.store import data_dir, read_store_meta

    directory = data_dir(directory)
    read_store_meta(directory)  # StoreError, saying what to do, where no store was loaded
    report = compact_event_log(directory)
    log.info("event log of %s: %s", directory, report.summary())
    return report
