"""The offline event log: what the stream ingester saw, appended to training data as it comes.

    plexrec features compact [--data-dir .plexrec]

The ingester appends every batch it consumes to ``offline/events/batch-*.parquet``
(features/ingest.py, ``Ingester._log``). That log is at-least-once: a re-delivered batch is
logged again, and so is an event its producer sent twice. ``compact_event_log`` makes it
training data by appending, never rewriting what it has:

  1. the new events (the batch files' rows whose event id neither the log nor an earlier row of
     the batch files holds: one DuckDB pass over the batch files' ids and the ids of the log's
     parts of the same event dates, a re-delivery has the event's own time) become, a group of
     about GROUP_EVENTS at a time, one part per event date, ``offline/events/log/date=YYYY-MM-DD/part-<seq>.parquet``,
     in event-time order (stable: among equal times, the order of logging)
  2. the same events as interaction rows in the store's columns, one part per compaction,
     ``offline/stream_interactions/part-<seq>.parquet`` (label or rating by the schema's rule,
     context columns, the schema's time unit, and an ``ordinal``: the order of logging), which
     training reads next to the bulk-loaded ``offline/interactions.parquet``
  3. the item attributes the new events carry (``item_attributes``, features/events.py) as rows of
     the item profile, ``offline/stream_item_profile/part-<seq>.parquet`` (only when some event
     carries any): one row per item and event instant, stamped with the event's time, holding the
     item's whole profile after the change (the columns an event does not carry keep the item's
     previous values: its newest streamed row, else the loaded one). What the ingester writes
     online, row for row: the attributes of an event older (to the second) than the item's newest
     streamed row are skipped there too. The example builders read these rows after the loaded
     item_profile (features/example_sql.py ``item_profile_query``), so a streamed attribute is in
     every example after its instant (never in its own event's: profiles are as of strictly
     before), and ``item_profiles`` gives every item's newest row (what publishing reads)
  4. ``offline/events/manifest.json`` names the committed parts: readers see only those
  5. the batch files are deleted

Merging. Each compaction that finds new events adds a part, so a learner compacting every poll
would leave tens of thousands a day, each a few files every reader lists and opens. So after each
append the parts are merged, size-tiered: a part is of level 0 when appended; while the newest
MERGE_FANIN parts have one level L and at most MERGE_MAX_EVENTS events together, they become one
part of level L+1 (per event date the log rows in commit order, stably sorted by event time; the
stream and item-profile rows in commit order, their ordinals as stored), under the oldest one's
key, so every reader's commit order stays. A store of n compactions holds about (MERGE_FANIN - 1)
* log(n) parts, and each event is rewritten once a level. A merge commits as an append does (its
files, then the manifest); the merged-away files are not deleted then, since a reader may hold
the old list for minutes (a training build, a learner window): the manifest lists them as retired
with the time, and the first compaction RETIRE_SECONDS later deletes them (the manifest without
them first). Each part records its highest offset per position, so a learner's ``events_after``
reads only the parts past its offsets.

So a compaction's cost is its new events (and the event ids of the dates they touch; with merging,
a few files per date), not the log's size. The views are not rebuilt: training computes every
example's history and counters from the events themselves (features/example_tables.py), and a
logged event that is a row of the bulk load (the same user, item and instant: a replay of what
was loaded) is dropped there, so it is neither a second example nor a second behaviour, also
after a later load.

Crash safety. Every file is written under a temporary name and renamed into place (fsynced).
The manifest is the commit: a kill before it leaves parts nobody reads, which the next
compaction deletes (sparing the retired files) before it does the same work again from the same
batch files (or the same merge); a kill after it leaves batch files whose events the log already
holds, which the next compaction drops as duplicates. So compaction is idempotent, and a kill
anywhere leaves a state the next one repairs. One compaction runs at a time (a lock file: the
ranks of a training job may start together); the ingester may go on writing batch files
meanwhile, which the next one takes.

A store whose event log was written under another schema (another data set loaded into the
same directory: features/log_stamp.py) refuses to compact it, naming the files to move away.

No torch on import (the ingester's side of the store).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.columns import microseconds, stored_column
from features import durable
from features.durable import exclusive, write_parquet, write_text
from features.example_sql import path_list
from features.events import InvalidEvent, NOT_CARRIED, item_category_of, make_event, stored_item_attributes
from features.log_stamp import file_fingerprints, store_fingerprint
from features.store import StoreError, data_dir, read_store_meta, stored_schema

log = logging.getLogger("plexrec.features")

LOG = "log"  # offline/events/log/date=YYYY-MM-DD/part-<seq>.parquet
LOG_UNDER_OFFLINE = "events"  # a log path under offline/ (a retired entry's): events/<log path>
MANIFEST = "manifest.json"  # offline/events/manifest.json: the committed parts
BATCH_FILES = "batch-*.parquet"  # the ingester's; its half-written ones end in .tmp
STREAM_INTERACTIONS = "stream_interactions"  # offline/stream_interactions/part-<seq>.parquet
STREAM_ITEM_PROFILE = "stream_item_profile"  # offline/stream_item_profile/part-<seq>.parquet
PROFILE_ORDER = "ordinal"  # a streamed profile row's order among the rows of one item and instant
LOCK = ".compaction.lock"
STREAM_SPLIT = "train"  # a schema's split column describes the bulk rows; streamed ones are new training data
READ_ATTEMPTS = 10
LOADED_KEY = ["user_id", "item_id", "timestamp"]  # a logged event with these of a loaded row is that row
GROUP_EVENTS = 1_000_000  # batch files' events committed together, at most (about): a compaction's memory
DEDUPE_MEMORY = "2GB"  # DuckDB's memory for finding a backlog's repeated event ids; it spills past it
ROWS_PER_PART = 1 << 28  # a stream row's ordinal: part seq * ROWS_PER_PART + its row in the part
# Merging (module doc): the newest MERGE_FANIN parts of one level become one part of the next. 8: a
# store keeps at most 7 parts a level, so about 7 * log8(compactions) parts (a day of a learner's
# 2-second polls, 43k compactions: 6 levels, at most ~40 parts; 16 would keep up to ~60 for one
# rewrite less), and each event is rewritten once a level (~5 times in a day); small merges are
# frequent and cheap, the rare big ones read at most MERGE_MAX_EVENTS events.
MERGE_FANIN = 8
MERGE_MAX_EVENTS = GROUP_EVENTS  # a merge reads its parts whole: the memory of a compaction's group
# A merged-away file stays on disk this long after the merge's commit: a reader that listed the
# parts before it (a training build, a learner window: minutes) still reads every file it listed.
RETIRE_SECONDS = 3600


def log_dir(directory: str | Path) -> Path:
    return Path(directory) / "offline" / "events"


def read_manifest(directory: str | Path) -> dict:
    """The committed parts: {"next": the next file seq, "parts": {seq: {"log": [paths under events/],
    "stream": path under offline/ or null, "item_profile": path under offline/ or absent, "events": n,
    "level": merges behind it (absent: 0), "offsets": {position: its highest offset} (absent: unknown)}},
    "retired": [{"paths": [merged-away files, under offline/], "at": epoch seconds}] (absent: none)}.
    A part's key orders it among the parts (commit order); a merged part keeps its oldest part's."""
    path = log_dir(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"next": 0, "parts": {}}


def log_parts(directory: str | Path, manifest: dict | None = None) -> list[Path]:
    """The committed log part files, in the order they were committed."""
    manifest = manifest or read_manifest(directory)
    return [log_dir(directory) / path for _, part in sorted(manifest["parts"].items(), key=lambda kv: int(kv[0]))
            for path in part["log"]]


def stream_parts(directory: str | Path, manifest: dict | None = None) -> list[Path]:
    """The committed stream interaction parts (offline/stream_interactions/part-*.parquet), oldest first."""
    manifest = manifest or read_manifest(directory)
    offline = Path(directory) / "offline"
    return [offline / part["stream"] for _, part in sorted(manifest["parts"].items(), key=lambda kv: int(kv[0]))
            if part.get("stream")]


def stream_item_profile_parts(directory: str | Path, manifest: dict | None = None) -> list[Path]:
    """The committed streamed item-profile parts (offline/stream_item_profile/part-*.parquet), oldest first."""
    manifest = manifest or read_manifest(directory)
    offline = Path(directory) / "offline"
    return [offline / part["item_profile"] for _, part in sorted(manifest["parts"].items(), key=lambda kv: int(kv[0]))
            if part.get("item_profile")]


def item_profiles(directory: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The offline item profile as it stands: every item's newest row (its newest streamed one, else
    the loaded one), ``columns`` of it (None: all) with item_id first; the loaded catalogue's items
    in its order, then those only the stream knows. What publishing reads."""
    directory = Path(directory)
    wanted = None if columns is None else ["item_id", *[c for c in columns if c != "item_id"]]
    loaded = pd.read_parquet(directory / "offline" / "item_profile.parquet", columns=wanted)
    parts = stream_item_profile_parts(directory)
    if not parts:
        return loaded.reset_index(drop=True)
    read = None if wanted is None else [*wanted, *(["event_timestamp"] if "event_timestamp" not in wanted else [])]
    streamed = pd.concat([pd.read_parquet(path, columns=None if read is None else [*read, PROFILE_ORDER])
                          for path in parts], ignore_index=True)
    streamed = streamed.sort_values(["event_timestamp", PROFILE_ORDER], kind="stable")
    streamed = streamed.drop_duplicates("item_id", keep="last")[list(loaded.columns)]
    both = pd.concat([loaded.astype(object), streamed.astype(object)], ignore_index=True)
    place = pd.Series(np.arange(len(loaded)), index=loaded["item_id"].to_numpy())
    key = place.reindex(both["item_id"].to_numpy()).to_numpy()  # the loaded row's place; NaN: a new item
    both["_place"] = np.where(np.isnan(key), len(loaded) + np.arange(len(both)), key)
    both = both.drop_duplicates("item_id", keep="last").sort_values("_place", kind="stable")
    both = both.drop(columns="_place").reset_index(drop=True)
    for column in loaded.columns:  # the loaded types back (a new item's missing values stay missing)
        if loaded[column].dtype != object:
            both[column] = both[column].astype(loaded[column].dtype)
    return both


def read_event_log(directory: str | Path) -> pd.DataFrame:
    """The offline event log, compacted or not: one row per event id, in event-time order (an empty
    frame when nothing was logged)."""
    events = log_dir(directory)
    for _ in range(READ_ATTEMPTS):
        paths = log_parts(directory) + sorted(events.glob(BATCH_FILES))
        try:
            return merged([pd.read_parquet(path) for path in paths])
        except FileNotFoundError:
            continue  # a compaction folded a batch file into the log, then deleted it: list again
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
    batch_files: int = 0  # batch files folded into the log, then deleted
    events_read: int = 0  # their rows
    duplicates: int = 0  # of which event ids the log already held (re-deliveries, producers' retries)
    new_events: int = 0  # appended to the log
    log_events: int = 0  # events in the log
    stream_interactions: int = 0  # new events that are interaction rows
    item_profile_rows: int = 0  # streamed item-profile rows written (item attributes the new events carry)
    orphans_removed: int = 0  # part files of a compaction killed before its commit
    merges: int = 0  # merges of MERGE_FANIN parts into one
    files_retired: int = 0  # part files merged away (deleted RETIRE_SECONDS later)
    retired_removed: int = 0  # retired files deleted
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.batch_files:
            return f"no new batch files, a log of {self.log_events:,} events; {self.seconds:.1f} s"
        return (f"{self.batch_files} batch files ({self.events_read:,} events, {self.duplicates:,} duplicate "
                f"event ids dropped): {self.new_events:,} events appended, a log of {self.log_events:,}; "
                f"{self.seconds:.1f} s")


def compact_event_log(directory: str | Path) -> Compaction:
    """Append the ingester's batch files to the log and to the stream interactions (see the module's doc)."""
    directory = Path(directory)
    started = time.perf_counter()
    report = Compaction()
    events = log_dir(directory)
    if events.is_dir():
        with exclusive(events / LOCK):
            _append(directory, report)
    report.seconds = time.perf_counter() - started
    return report


def _append(directory: Path, report: Compaction) -> None:
    events = log_dir(directory)
    manifest = read_manifest(directory)
    report.orphans_removed = _remove_orphans(directory, manifest)
    manifest = _remove_retired(directory, manifest, report)
    manifest = _merge(directory, manifest, report)  # normally nothing: a merge a kill cut short
    report.log_events = sum(part["events"] for part in manifest["parts"].values())
    batches = sorted(events.glob(BATCH_FILES))  # by name: the time each was logged
    if not batches:
        return
    mine = store_fingerprint(directory)  # a batch file logged before stamps existed (None) is taken
    foreign = [batch for batch in batches if file_fingerprints(batch) - {mine, None}]
    if foreign:
        raise StoreError(f"{len(foreign)} event log file(s) in {events} were logged into a store of another "
                         f"schema (e.g. {foreign[0].name}): move them away (or delete them) and compact again")
    report.batch_files = len(batches)
    repeated = _repeated_rows(directory, manifest, batches)
    for group in _groups(batches):  # a group at a time: memory is set by GROUP_EVENTS, not by the backlog
        manifest = _merge(directory, _append_group(directory, group, repeated, manifest, report), report)
        for batch in group:  # only now: every event of theirs is in a committed part
            batch.unlink(missing_ok=True)


def _groups(batches: list[Path]) -> list[list[Path]]:
    """Consecutive batch files of about GROUP_EVENTS events together (at least one file each)."""
    groups, current, count = [], [], 0
    for batch in batches:
        rows = pq.ParquetFile(batch).metadata.num_rows
        if current and count + rows > GROUP_EVENTS:
            groups.append(current)
            current, count = [], 0
        current.append(batch)
        count += rows
    return groups + ([current] if current else [])


def _append_group(directory: Path, batches: list[Path], repeated: dict[str, np.ndarray], manifest: dict,
                  report: Compaction) -> dict:
    """Commit the new events of ``batches`` (their rows but ``repeated``'s) as the next part; the
    manifest after it."""
    events = log_dir(directory)
    frames = [pd.read_parquet(batch) for batch in batches]
    read = sum(len(frame) for frame in frames)
    new = merged([frame[~np.isin(np.arange(len(frame)), repeated.get(str(batch), []))]
                  for batch, frame in zip(batches, frames)])
    report.events_read += read
    report.duplicates += read - len(new)
    if not len(new):
        return manifest
    seq = int(manifest["next"])
    part = {"log": [], "stream": None, "events": len(new), "level": 0, "offsets": last_offsets(new)}
    for date, rows in new.groupby(_dates(new), sort=True):
        relative = f"{LOG}/date={date}/part-{seq:08d}.parquet"
        write_parquet(rows.reset_index(drop=True), events / relative)
        part["log"].append(relative)
    rows = stream_interactions(new, stored_schema(directory), read_store_meta(directory)["types"])
    rows["ordinal"] = seq * ROWS_PER_PART + np.arange(len(rows), dtype=np.int64)
    part["stream"] = f"{STREAM_INTERACTIONS}/part-{seq:08d}.parquet"
    write_parquet(rows, directory / "offline" / part["stream"])
    profile = stream_item_profile_rows(directory, new, manifest)
    if profile is not None and profile.num_rows:
        order = pa.array(seq * ROWS_PER_PART + np.arange(profile.num_rows, dtype=np.int64))
        part["item_profile"] = f"{STREAM_ITEM_PROFILE}/part-{seq:08d}.parquet"
        _write_table(profile.append_column(PROFILE_ORDER, order), directory / "offline" / part["item_profile"])
        report.item_profile_rows += profile.num_rows
    manifest = {**manifest, "next": seq + 1, "parts": {**manifest["parts"], str(seq): part}}
    write_text(json.dumps(manifest, indent=1) + "\n", events / MANIFEST)  # the commit
    report.new_events += len(new)
    report.stream_interactions += len(rows)
    report.log_events += len(new)
    return manifest


def _dates(frame: pd.DataFrame) -> pd.Series:
    return pd.to_datetime(frame["event_timestamp"], utc=True).dt.strftime("%Y-%m-%d")


def _repeated_rows(directory: Path, manifest: dict, batches: list[Path]) -> dict[str, np.ndarray]:
    """Per batch file (its path), the rows that are no new event: an event id the committed log
    holds on the batch files' event dates (a re-delivered event keeps its time), or one an earlier
    row holds (files in name order: the order they were logged). One DuckDB pass over the backlog's
    ids and the log's ids of those dates, spilling past DEDUPE_MEMORY, for the whole backlog: were
    each group to read the log's ids of its dates, a backlog spanning the log's dates (a replay, a
    first compaction) would read the log once a group, its time growing with the square of its size."""
    import shutil
    import tempfile

    import duckdb

    dates = set()
    for batch in batches:
        stamps = pq.read_table(batch, columns=["event_timestamp"]).column(0)
        dates.update(pc.unique(pc.strftime(stamps, format="%Y-%m-%d")).to_pylist())
    logged = [path for path in log_parts(directory, manifest) if path.parent.name.removeprefix("date=") in dates]
    spill = tempfile.mkdtemp(prefix="plexrec-compaction-")
    try:
        connection = duckdb.connect()
        connection.execute(f"SET memory_limit = '{DEDUPE_MEMORY}'")
        connection.execute(f"SET temp_directory = '{spill}'")
        connection.execute("SET preserve_insertion_order = false")
        # file_row_number: the row of the file, as pandas reads it (the ingester writes no index)
        connection.execute("CREATE VIEW backlog AS SELECT CAST(event_id AS VARCHAR) AS event_id, filename, "
                           f"file_row_number FROM read_parquet({path_list(batches)}, filename = true, "
                           "file_row_number = true)")
        query = """
            WITH repeated_ids AS (SELECT event_id FROM backlog GROUP BY event_id HAVING count(*) > 1)
            SELECT filename, file_row_number FROM (
                SELECT filename, file_row_number,
                       row_number() OVER (PARTITION BY event_id ORDER BY filename, file_row_number) AS nth
                FROM backlog WHERE event_id IN (SELECT event_id FROM repeated_ids))
            WHERE nth > 1"""
        if logged:
            query += (" UNION SELECT filename, file_row_number FROM backlog WHERE event_id IN "
                      f"(SELECT CAST(event_id AS VARCHAR) FROM read_parquet({path_list(logged)}))")
        rows = connection.sql(query).to_arrow_table()
        connection.close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    if not rows.num_rows:
        return {}
    frame = pd.DataFrame({"file": rows.column("filename").to_numpy(zero_copy_only=False),
                          "row": rows.column("file_row_number").to_numpy()})
    return {file: group.to_numpy(dtype=np.int64) for file, group in frame.groupby("file")["row"]}


def _remove_orphans(directory: Path, manifest: dict) -> int:
    """Delete the part files neither a committed part nor a retired entry names (a compaction killed
    before its commit, or after a commit that dropped retired files, before it deleted them)."""
    offline = directory / "offline"  # every path below is built on it: compared as they are (no resolve)
    committed = {*log_parts(directory, manifest), *stream_parts(directory, manifest),
                 *stream_item_profile_parts(directory, manifest)}
    committed |= {offline / path for entry in manifest.get("retired", []) for path in entry["paths"]}
    candidates = [*(log_dir(directory) / LOG).glob("date=*/part-*"),
                  *(offline / STREAM_INTERACTIONS).glob("part-*"),
                  *(offline / STREAM_ITEM_PROFILE).glob("part-*")]
    orphans = [path for path in candidates if path not in committed]
    for path in orphans:
        path.unlink(missing_ok=True)
    return len(orphans)


def _remove_retired(directory: Path, manifest: dict, report: Compaction) -> dict:
    """Delete the files merged away more than RETIRE_SECONDS ago: the manifest without them first
    (the commit), then the files (a kill between leaves orphans, which the next compaction deletes)."""
    retired = manifest.get("retired", [])
    now = time.time()
    expired = [entry for entry in retired if now - float(entry["at"]) >= RETIRE_SECONDS]
    if not expired:
        return manifest
    manifest = {**manifest, "retired": [entry for entry in retired if now - float(entry["at"]) < RETIRE_SECONDS]}
    write_text(json.dumps(manifest, indent=1) + "\n", log_dir(directory) / MANIFEST)
    for entry in expired:
        for path in entry["paths"]:
            (directory / "offline" / path).unlink(missing_ok=True)
        report.retired_removed += len(entry["paths"])
    return manifest


class _Unmergeable(Exception):
    """Parts whose files do not have one set of columns (a log written by an older ingester)."""


def _merge(directory: Path, manifest: dict, report: Compaction) -> dict:
    """While the newest MERGE_FANIN parts have one level and at most MERGE_MAX_EVENTS events, merge
    them into one part of the next level (module doc); the manifest after it."""
    while len(manifest["parts"]) >= MERGE_FANIN:
        keys = sorted(manifest["parts"], key=int)[-MERGE_FANIN:]
        parts = [manifest["parts"][key] for key in keys]
        levels = {int(part.get("level", 0)) for part in parts}
        if len(levels) > 1 or sum(int(part["events"]) for part in parts) > MERGE_MAX_EVENTS:
            break
        try:
            manifest = _merge_parts(directory, manifest, keys, levels.pop() + 1, report)
        except _Unmergeable as exc:
            log.warning("event log parts %s left unmerged: %s", ", ".join(keys), exc)
            break
    return manifest


def _merge_parts(directory: Path, manifest: dict, keys: list[str], level: int, report: Compaction) -> dict:
    """Commit the parts ``keys`` (consecutive, oldest first) as one part under the oldest's key, its
    files named by a fresh seq: per event date the log rows in commit order, stably sorted by event
    time (the order the log promises); the stream rows and the item-profile rows in commit order, with
    their ordinals as stored. The merged-away files are retired, not deleted (module doc)."""
    events, offline = log_dir(directory), directory / "offline"
    parts = [manifest["parts"][key] for key in keys]
    seq = int(manifest["next"])
    merged_part = {"log": [], "stream": None, "events": sum(int(part["events"]) for part in parts), "level": level}
    if all("offsets" in part for part in parts):
        offsets: dict[str, int] = {}
        for part in parts:
            for position, offset in part["offsets"].items():
                offsets[position] = max(int(offset), offsets.get(position, -1))
        merged_part["offsets"] = offsets
    by_date: dict[str, list[str]] = {}
    for part in parts:
        for relative in part["log"]:
            by_date.setdefault(Path(relative).parent.name.removeprefix("date="), []).append(relative)
    retired = [f"{LOG_UNDER_OFFLINE}/{relative}" for part in parts for relative in part["log"]]
    for date in sorted(by_date):
        table = _concatenated([events / relative for relative in by_date[date]])
        table = table.take(pc.sort_indices(table, sort_keys=[("event_timestamp", "ascending")]))  # stable
        relative = f"{LOG}/date={date}/part-{seq:08d}.parquet"
        _write_table(table, events / relative)
        merged_part["log"].append(relative)
    for kind, folder in (("stream", STREAM_INTERACTIONS), ("item_profile", STREAM_ITEM_PROFILE)):
        paths = [part[kind] for part in parts if part.get(kind)]
        if paths:
            merged_part[kind] = f"{folder}/part-{seq:08d}.parquet"
            _write_table(_concatenated([offline / path for path in paths]), offline / merged_part[kind])
            retired += paths
    remaining = {key: part for key, part in manifest["parts"].items() if key not in keys}
    manifest = {**manifest, "next": seq + 1, "parts": {**remaining, keys[0]: merged_part},
                "retired": [*manifest.get("retired", []), {"paths": retired, "at": time.time()}]}
    write_text(json.dumps(manifest, indent=1) + "\n", events / MANIFEST)  # the commit
    report.merges += 1
    report.files_retired += len(retired)
    return manifest


def _concatenated(paths: list[Path]) -> pa.Table:
    """The rows of ``paths`` in order, as one table (a column that is all null in some file takes the
    others' type); _Unmergeable when their columns differ."""
    tables = [pq.read_table(path) for path in paths]
    names = {tuple(sorted(table.column_names)) for table in tables}
    if len(names) > 1:
        raise _Unmergeable(f"{paths[0].parent} holds files of different columns: {sorted(names)}")
    try:
        table = pa.concat_tables([table.select(tables[0].column_names) for table in tables],
                                 promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _Unmergeable(str(exc)) from None
    return table.combine_chunks()


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
    """The committed log's label events past ``offsets`` (position -> the last offset taken, see
    ``positions``) as interaction rows in event-time order, without those that are rows of the bulk
    load; and the offsets they reach (a position with nothing new keeps its offset). What a job that
    follows the stream (recsys/learn.py) takes next; call compact_event_log first. Reads the
    positions of the parts that may hold new events (not those whose highest offset per position,
    in the manifest, is taken), then the rows of the new events only."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    ahead = {key: part for key, part in manifest["parts"].items() if "offsets" not in part  # unknown: read it
             or any(int(offset) > offsets.get(position, -1) for position, offset in part["offsets"].items())}
    parts = log_parts(directory, {**manifest, "parts": ahead})
    if not parts:
        return pd.DataFrame(), dict(offsets)
    where = pq.ParquetDataset(parts).read(columns=[c for c in ("source", "partition", "offset")
                                                    if c in pq.read_schema(parts[0]).names]).to_pandas()
    taken = positions(where).map(lambda position: offsets.get(position, -1)).to_numpy(np.int64)
    is_new = where["offset"].to_numpy(np.int64) > taken
    if not is_new.any():
        return pd.DataFrame(), dict(offsets)
    new = merged([pd.read_parquet(path) for path in _files_holding(parts, is_new)])
    new = new[new["offset"].to_numpy(np.int64) > positions(new).map(lambda p: offsets.get(p, -1)).to_numpy(np.int64)]
    reached = {**offsets, **last_offsets(new)}
    schema = stored_schema(directory)
    rows = stream_interactions(new.reset_index(drop=True), schema, read_store_meta(directory)["types"])
    users = sorted(set(rows["user_id"].tolist()))
    bulk = pd.read_parquet(directory / "offline" / "interactions.parquet", columns=LOADED_KEY,
                           filters=[("user_id", "in", users)])  # row groups of other users are skipped
    rows = rows[~_rows_of(rows, bulk)]
    return rows.sort_values("timestamp", kind="stable").reset_index(drop=True), reached


def _files_holding(parts: list[Path], is_new: np.ndarray) -> list[Path]:
    """The part files that hold a True of ``is_new`` (rows in the order of ``parts``)."""
    counts = [pq.ParquetFile(path).metadata.num_rows for path in parts]
    ends = np.cumsum(counts)
    return [path for path, end, count in zip(parts, ends, counts) if is_new[end - count:end].any()]


def _rows_of(rows: pd.DataFrame, bulk: pd.DataFrame) -> np.ndarray:
    """Which of ``rows`` are rows of the bulk load (the same user, item and instant)."""
    return pd.MultiIndex.from_frame(rows[LOADED_KEY]).isin(pd.MultiIndex.from_frame(bulk[LOADED_KEY]))


def stream_interactions(compacted: pd.DataFrame, schema, types: dict[str, str]) -> pd.DataFrame:
    """Logged events as rows of offline/interactions.parquet: user_id, item_id, timestamp in the
    schema's unit, the label or rating column, the split column, the context columns as stored."""

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


def stream_item_profile_rows(directory: Path, new: pd.DataFrame, manifest: dict) -> pa.Table | None:
    """The item-profile rows of the item attributes ``new`` events carry (module doc, step 3), in
    the loaded item_profile's column types; None when none carries any. Reads the previous rows of
    the items they touch only (the loaded profile's, and the committed streamed ones')."""
    if "item_attributes" not in new or not len(new):
        return None
    carrying = new[new["item_attributes"].fillna("{}").astype(str) != "{}"]
    if not len(carrying):
        return None
    schema, types = stored_schema(directory), read_store_meta(directory)["types"]
    columns = [*schema.items.columns, "item_category"]
    # as the ingester converts them (features/events.py); the new events only, those that carry any
    values = {c: [] for c in columns}
    carried = {c: [] for c in columns}
    keep = []
    for attributes, item in zip(carrying["item_attributes"].map(json.loads), carrying["item_id"].tolist()):
        try:
            event = make_event(user_id=0, item_id=int(item), item_attributes=attributes)
            stored = stored_item_attributes(event, schema, types)
            category = item_category_of(event, schema)
        except InvalidEvent as exc:  # the store was loaded with another schema since it was ingested
            log.warning("item attributes of item %s left out of the offline profile: %s", item, exc)
            keep.append(False)
            continue
        keep.append(True)
        for column in schema.items.columns:
            carried[column].append(column in stored)
            values[column].append(stored.get(column))
        carried["item_category"].append(category is not NOT_CARRIED)
        values["item_category"].append(None if category is NOT_CARRIED else category)
    carrying = carrying[np.array(keep, dtype=bool)]
    if not len(carrying):
        return None
    items = carrying["item_id"].to_numpy(np.int64)
    micros = microseconds(pd.to_datetime(carrying["event_timestamp"], utc=True))
    before = _newest_profiles(directory, manifest, np.unique(items), columns)
    # the ingester skips an event older (to the second) than the row's time: the loaded row's is the epoch
    base_seconds = pd.Series(before["at_us"].to_numpy() // 1_000_000, index=before["item_id"])
    stored_seconds = base_seconds.reindex(items).fillna(0).to_numpy(np.int64)
    applies = micros // 1_000_000 >= stored_seconds
    frame = pd.DataFrame({"item_id": items, "at_us": micros, "position": np.arange(len(items))})[applies]
    frame = frame.sort_values(["item_id", "at_us", "position"], kind="stable").reset_index(drop=True)
    if not len(frame):
        return None
    # each row: the item's previous values, overwritten by the newest of its events up to it that carries the column
    previous = before.set_index("item_id").reindex(frame["item_id"])
    positions = frame["position"].to_numpy()
    index = pd.Series(np.arange(len(frame)))
    out = {"item_id": frame["item_id"].to_numpy(np.int64)}
    for column in columns:
        mask = np.asarray(carried[column], dtype=bool)[positions]
        latest = pd.Series(np.where(mask, index, -1)).groupby(frame["item_id"]).cummax().to_numpy()
        mine = pd.Series(values[column], dtype=object).to_numpy()[positions]  # lists stay one cell each
        out[column] = np.where(latest >= 0, mine[np.maximum(latest, 0)], previous[column].to_numpy(dtype=object))
    out["event_timestamp"] = pd.to_datetime(frame["at_us"].to_numpy(), unit="us", utc=True)
    rows = pd.DataFrame(out)
    rows = rows[~rows.duplicated(["item_id", "event_timestamp"], keep="last")]  # an instant's last event wins
    rows = rows.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    return _as_loaded_profile(directory, rows, types)


def _newest_profiles(directory: Path, manifest: dict, items: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """The newest profile row of each of ``items`` that has one (streamed, else loaded), with ``at_us``."""
    wanted = ["item_id", *columns, "event_timestamp"]
    filters = [("item_id", "in", items.tolist())]
    frames = []
    loaded = directory / "offline" / "item_profile.parquet"
    if loaded.is_file():
        frames.append(pd.read_parquet(loaded, columns=wanted, filters=filters).assign(**{PROFILE_ORDER: -1}))
    for path in stream_item_profile_parts(directory, manifest):
        frames.append(pd.read_parquet(path, columns=[*wanted, PROFILE_ORDER], filters=filters))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in wanted} | {"at_us": pd.Series(dtype=np.int64)})
    both = pd.concat([f.astype({c: object for c in columns}) for f in frames], ignore_index=True)
    both["at_us"] = microseconds(pd.to_datetime(both["event_timestamp"], utc=True))
    both = both.sort_values(["at_us", PROFILE_ORDER], kind="stable")
    return both.drop_duplicates("item_id", keep="last").reset_index(drop=True)


def _as_loaded_profile(directory: Path, rows: pd.DataFrame, types: dict[str, str]) -> pa.Table:
    """Streamed profile rows in the loaded item_profile's Arrow types (so the engines union the two)."""
    loaded = directory / "offline" / "item_profile.parquet"
    for column in rows.columns:
        if column in types:
            rows[column] = stored_column(rows[column].where(rows[column].notna(), None), types[column]) \
                if types[column] in ("Float32", "Int64") else rows[column]
    table = pa.Table.from_pandas(rows, preserve_index=False)
    if loaded.is_file():
        target = pq.read_schema(loaded).remove_metadata()
        table = table.select(target.names).cast(target)
    return table


def _write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    pq.write_table(table, staging)
    durable.durably_replace(staging, path)  # looked up at each call: tests stand in for it


def event_times(logged: pd.DataFrame, schema) -> np.ndarray:
    """Logged events' times in the schema's unit, as the ingester converts them for the online history."""

    return microseconds(logged["event_timestamp"]) // 1000 * schema.units_per_second // 1000


def rating_of(value: pd.Series, label: np.ndarray, threshold: float) -> np.ndarray:
    """The rating column of logged events in a rating schema: each event's rating, or where it has
    none or was labelled against it (an explicit label field wins: features/events.py event_label),
    a rating on the label's side of the threshold, so that training labels it as the ingester did."""
    rating = pd.to_numeric(value, errors="coerce").to_numpy(np.float64)
    agrees = ~np.isnan(rating) & ((rating >= threshold) == (label == 1))
    return np.where(agrees, rating, np.where(label == 1, threshold, threshold - 1))


def compaction_lock(directory: str | Path):
    """The lock compactions hold: whoever rewrites the offline store (a load) takes it too."""
    log_dir(directory).mkdir(parents=True, exist_ok=True)
    return exclusive(log_dir(directory) / LOCK)


def main(directory: str | Path | None = None) -> Compaction:
    """`plexrec features compact`: append the store's new logged events to the log and the training rows."""
    directory = data_dir(directory)
    read_store_meta(directory)  # StoreError, saying what to do, where no store was loaded
    report = compact_event_log(directory)
    log.info("event log of %s: %s", directory, report.summary())
    return report
