"""Publish trained item embeddings into the feature store: only what changed, one file per version.

A publish of version V compares V's vectors with the store's (every item's newest published
row) and writes only the items whose vectors differ (absolute tolerance 1e-7; every item at a
store's first publish, or when the widths change), online (``write_to_online_store`` in
chunks: 100k 64-d rows take about 10 s on SQLite, ``push()`` is 2-4x slower) and offline, in
a file of V's own under ``offline/item_embeddings/``:

    <version>.parquet          the rows V's publish wrote: item_id, attention_embedding,
                               representation_embedding, model_version = V, event_timestamp =
                               the publish's instant. Its footer records that instant
                               (``plexrec.published_at_us``). It exists, possibly with no row,
                               once V's publish is complete
    carried-<us>.parquet       rows of pruned versions that are still some item's newest (below);
                               its footer maps each version it holds to its publish instant
    <version>.parquet.pending  V's rows while they are written online (a kill leaves it: the next
                               publish or prune writes its rows online and completes it)
    .<name>.tmp                a file being written (a kill leaves it: removed, never read)

The Feast view ``item_embeddings`` reads ``offline/item_embeddings/*.parquet`` (Feast 0.67's
DuckDB offline store reads a FileSource whose path is a glob of Parquet files, not a
directory; measured), so ``feast materialize`` and point-in-time reads take every item's newest
row: an item V left alone keeps the row of the version that last changed it.

Which vectors serving may use (features/online.py, serving/inputs.py). A row says which
version computed its vectors (P). They are V's own vectors when P = V, or when V's publish is
complete and P's publish came before it: V's publish compared V's vectors with the row and left
it alone, so they are equal. So an item a version did not republish still counts as "used" by
serving, and a row another publish wrote after V's ("stale" for V) never does. The instants
come from the files' footers (``PublishedVersions``), not from the online rows (SQLite keeps
their timestamps to the second). A row of a version no complete file knows (a publish killed
before its file, a writer outside this module) is never used.

Crash safety. Every file is written under a temporary name, fsynced and renamed over its
target, and the directory fsynced. A publish writes its rows as ``<version>.parquet.pending``
first, then online, then renames the file to ``<version>.parquet``: the offline files always
hold every online row, and a kill anywhere leaves a state the next publish repairs. An
unreadable ``.parquet`` (the 0-byte ``offline/item_embeddings.parquet`` that a kill left in the
single-file layout before this one) is moved aside as ``.damaged`` with a warning; its items
are published again by the next publish (their vectors are then missing from the store). The
single-file layout's readable file is taken over as a carried file. Publishes and prunes take
a lock file, one at a time.

Pruning (``prune_item_embeddings``, called by ``plexrec learn`` with the versions it removes
beyond ``--keep-versions``): a pruned version's file goes; its rows that are still some item's
newest move to a new carried file first. Carried files are merged when the newest holds at
least half as many live rows as the one before it (and dropped when none of their rows is
live), so every row is rewritten O(log catalogue) times in all, not at every prune.

Cost per publish: the changed rows (written once online and once offline) and the footers of
files the caller has not seen. A caller that publishes again and again (the learner) keeps a
``PublishedEmbeddings`` (the store's newest vectors, read once) and passes it as ``state``;
without one the files are read whole. No torch: the caller hands over plain arrays.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.durable import durably_replace, exclusive, fsync_dir
from features.store import data_dir

log = logging.getLogger("plexrec.features")
VIEW = "item_embeddings"
FOLDER = "item_embeddings"  # offline/item_embeddings/
PENDING = ".pending"
CARRIED = "carried-"
DAMAGED = ".damaged"
LEGACY = "item_embeddings.parquet"  # offline/item_embeddings.parquet: the single-file layout before this one
LOCK = ".publish.lock"
PUBLISHED_AT = b"plexrec.published_at_us"
VERSIONS = b"plexrec.versions"
TOLERANCE = 1e-7  # vectors within this (absolute, per element) of the published ones are unchanged


def embeddings_dir(directory: str | Path | None = None) -> Path:
    return data_dir(directory) / "offline" / FOLDER


def _check_version(version: str) -> None:
    if (not version or version[0] in "._" or "/" in version or os.sep in version
            or version.startswith(CARRIED) or version.endswith((PENDING, DAMAGED))):
        raise ValueError(f"model version {version!r} cannot name a file of {FOLDER}/ (it must not start with "
                         f"'.', '_' or {CARRIED!r}, nor hold a '/')")


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([("item_id", pa.int64()), ("attention_embedding", pa.list_(pa.float32())),
                      ("representation_embedding", pa.list_(pa.float32())), ("model_version", pa.string()),
                      ("event_timestamp", pa.timestamp("us", tz="UTC"))])


def _lists(matrix: np.ndarray):
    """A [n, d] matrix as an Arrow list<float32> column of n vectors (d may be 0)."""
    import pyarrow as pa

    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    offsets = np.arange(len(matrix) + 1, dtype=np.int32) * matrix.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel(), type=pa.float32()))


def _newest_per_item(ids: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """Positions of each item's newest row (the last of equally new ones)."""
    order = np.argsort(stamps, kind="stable")
    _, first_from_end = np.unique(ids[order][::-1], return_index=True)
    return order[len(order) - 1 - first_from_end]


@dataclass
class Rows:
    """Rows of item embeddings: one per item id, with the version and instant that published them."""
    ids: np.ndarray  # int64
    representation: list[np.ndarray] | np.ndarray  # [n, d_r] (or one vector per row when widths differ)
    attention: list[np.ndarray] | np.ndarray
    versions: np.ndarray  # object (str)
    stamps: np.ndarray  # int64, microseconds since the epoch

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, where: np.ndarray) -> Rows:
        """The rows at ``where`` (a boolean mask or positions)."""
        index = np.flatnonzero(where) if where.dtype == bool else where
        return Rows(self.ids[index], _take(self.representation, index), _take(self.attention, index),
                    self.versions[index], self.stamps[index])

    def table(self):
        import pyarrow as pa

        def lists(vectors):
            if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
                return _lists(vectors)
            return pa.array([np.asarray(v, dtype=np.float32) for v in vectors], type=pa.list_(pa.float32()))

        return pa.table([pa.array(self.ids, type=pa.int64()), lists(self.attention), lists(self.representation),
                         pa.array(self.versions.astype(str), type=pa.string()),
                         pa.array(self.stamps.astype("datetime64[us]"), type=pa.timestamp("us", tz="UTC"))],
                        schema=_arrow_schema())

    def frame(self):
        import pandas as pd

        return pd.DataFrame({"item_id": self.ids,
                             "attention_embedding": list(self.attention),
                             "representation_embedding": list(self.representation),
                             "model_version": self.versions.astype(str),
                             "event_timestamp": pd.to_datetime(self.stamps, unit="us", utc=True)})


def _take(vectors, index: np.ndarray):
    if isinstance(vectors, np.ndarray):
        return vectors[index]
    return [vectors[i] for i in index]


def _read_rows(path: Path) -> tuple[Rows, dict]:
    """A file's rows and its footer's metadata (Damaged: a file Parquet cannot read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:  # truncated, 0 bytes, not Parquet (FileNotFoundError: raised)
        if isinstance(exc, FileNotFoundError):
            raise
        raise Damaged(f"{type(exc).__name__}: {exc}") from exc
    ids = table.column("item_id").to_numpy().astype(np.int64)

    def vectors(name):
        column = table.column(name).combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
        widths = np.diff(offsets)
        if len(widths) and (widths == widths[0]).all():
            start = offsets[0]
            return values[start:start + widths.sum()].reshape(len(widths), int(widths[0]))
        if not len(widths):
            return np.zeros((0, 0), dtype=np.float32)
        return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    stamps = table.column("event_timestamp").cast(pa.timestamp("us", tz="UTC")).to_numpy().astype("datetime64[us]")
    rows = Rows(ids, vectors("representation_embedding"), vectors("attention_embedding"),
                table.column("model_version").to_numpy(zero_copy_only=False).astype(object),
                stamps.astype(np.int64))
    return rows, dict(table.schema.metadata or {})


class Damaged(Exception):
    """A file of item embeddings that Parquet cannot read."""


def _footer(path: Path) -> dict:
    import pyarrow.parquet as pq

    return dict(pq.read_schema(path).metadata or {})


def _versions_of(path: Path, footer: dict) -> dict[str, int]:
    """version -> publish instant, of the rows a complete file holds."""
    if VERSIONS in footer:
        return {str(v): int(t) for v, t in json.loads(footer[VERSIONS]).items()}
    if PUBLISHED_AT in footer:
        return {path.name[:-len(".parquet")]: int(footer[PUBLISHED_AT])}
    return {}


def _write(rows: Rows, path: Path, footer: dict[bytes, bytes]) -> None:
    """``rows`` as ``path``, atomically and durably (temp file, fsync, rename, directory fsync)."""
    import pyarrow.parquet as pq

    staging = path.parent / f".{path.name}.tmp"
    pq.write_table(rows.table().replace_schema_metadata(footer), staging)
    durably_replace(staging, path)


def _rename(source: Path, target: Path) -> None:
    os.replace(source, target)
    fsync_dir(target.parent)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_dir(paths[0].parent)


def _exclusive(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    return exclusive(folder / LOCK)


@dataclass
class PublishedEmbeddings:
    """The store's newest published vectors per item, and which file holds each item's newest row:
    what a publish compares with. Kept by a caller that publishes again and again (the learner);
    brought up to date from the files it has not read at every publish and prune."""
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # [R | A]; NaN: other widths
    widths: tuple[int, int] | None = None  # (d_r, d_a) of ``vectors``
    stamps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    files: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # index into names
    names: list[str] = field(default_factory=list)
    known: dict[str, dict[str, int]] = field(default_factory=dict)  # file name read -> its versions' instants

    def latest_instant(self) -> int:
        return max((t for versions in self.known.values() for t in versions.values()), default=0)

    def _name_index(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def merge(self, rows: Rows, file_name: str) -> None:
        """Rows of ``file_name``: each replaces its item's row where it is as new or newer."""
        if not len(rows):
            return
        newest = rows.take(_newest_per_item(rows.ids, rows.stamps))
        ids, stamps = newest.ids, newest.stamps
        vectors = self._vectors_of(newest.representation, newest.attention, len(ids))
        file_index = self._name_index(file_name)
        position = np.searchsorted(self.ids, ids)
        clipped = np.minimum(position, max(len(self.ids) - 1, 0))
        found = (position < len(self.ids)) & (self.ids[clipped] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        newer = found.copy()
        newer[found] = stamps[found] >= self.stamps[clipped[found]]
        target = clipped[newer]
        self.vectors[target] = vectors[newer]
        self.stamps[target] = stamps[newer]
        self.files[target] = file_index
        new = ~found
        if new.any():
            all_ids = np.concatenate([self.ids, ids[new]])
            order = np.argsort(all_ids, kind="stable")
            self.ids = all_ids[order]
            self.vectors = np.concatenate([self.vectors, vectors[new]])[order]
            self.stamps = np.concatenate([self.stamps, stamps[new]])[order]
            self.files = np.concatenate([self.files, np.full(int(new.sum()), file_index)])[order]

    def _vectors_of(self, representation, attention, count: int) -> np.ndarray:
        """[count, d_r + d_a] in the state's widths (taken from these rows when it has none); NaN rows
        for vectors of other widths."""
        def width(vectors) -> int | None:
            if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
                return vectors.shape[1]
            return None

        if self.widths is None and width(representation) is not None and width(attention) is not None:
            self.widths = (width(representation), width(attention))
            self.vectors = np.full((len(self.ids), sum(self.widths)), np.nan, dtype=np.float32)
        if self.widths is None:
            return np.full((count, 0), np.nan, dtype=np.float32)
        out = np.full((count, sum(self.widths)), np.nan, dtype=np.float32)
        if (width(representation), width(attention)) == self.widths:
            out[:, :self.widths[0]] = representation
            out[:, self.widths[0]:] = attention
        return out

    def changed(self, ids: np.ndarray, representation: np.ndarray, attention: np.ndarray) -> np.ndarray:
        """Per item, whether its vectors differ from the published ones (or none are published)."""
        widths = (representation.shape[1], attention.shape[1])
        if self.widths != widths:  # another model's shape: nothing to compare with
            self.widths = widths
            self.vectors = np.full((len(self.ids), sum(widths)), np.nan, dtype=np.float32)
            return np.ones(len(ids), dtype=bool)
        position = np.searchsorted(self.ids, ids)
        clipped = np.minimum(position, max(len(self.ids) - 1, 0))
        if not len(self.ids):
            return np.ones(len(ids), dtype=bool)
        found = (position < len(self.ids)) & (self.ids[clipped] == ids)
        ours = np.concatenate([representation, attention], axis=1).astype(np.float32)
        same = np.isclose(self.vectors[clipped], ours, rtol=0, atol=TOLERANCE).all(axis=1)
        return ~(found & same)

    def live(self, file_name: str) -> np.ndarray:
        """The item ids whose newest row is in ``file_name``."""
        if file_name not in self.names:
            return np.zeros(0, dtype=np.int64)
        return self.ids[self.files == self.names.index(file_name)]

    def forget(self, file_name: str) -> None:
        self.known.pop(file_name, None)


def _recover(folder: Path, state: PublishedEmbeddings, store) -> None:
    """Under the lock: half-written files removed, the single-file layout taken over, damaged files
    moved aside, the files ``state`` has not read merged into it, and every pending publish completed
    (its live rows written online to ``store``)."""
    for staging in folder.glob(".*.tmp"):
        staging.unlink(missing_ok=True)
    legacy = folder.parent / LEGACY
    if legacy.exists():
        _take_over(legacy, folder)
    present = {p.name for p in folder.glob("*.parquet")}
    for name in list(state.known):
        if name not in present:
            state.forget(name)  # pruned by another process: its live rows were carried first
    for name in sorted(present - set(state.known), key=lambda n: (not n.startswith(CARRIED), n)):
        path = folder / name
        try:
            rows, footer = _read_rows(path)
        except FileNotFoundError:
            continue
        except Damaged as exc:
            log.warning("%s is unreadable (%s): moved aside as %s; its items are published again by the next "
                        "publish", path, exc, path.name + DAMAGED)
            _rename(path, path.with_name(path.name + DAMAGED))
            continue
        state.merge(rows, name)
        state.known[name] = _versions_of(path, footer)
    for path in sorted(folder.glob("*.parquet" + PENDING)):
        try:
            rows, footer = _read_rows(path)
        except Damaged as exc:
            log.warning("%s is unreadable (%s): removed (it was fsynced before any online write, so this is "
                        "not a kill; the disk?)", path, exc)
            _remove([path])
            continue
        name = path.name[:-len(PENDING)]
        state.merge(rows, name)
        live = np.isin(rows.ids, state.live(name))
        _write_online(store, rows.take(live))
        _rename(path, folder / name)
        state.known[name] = _versions_of(folder / name, footer)
        log.info("completed the publish of %s that a kill interrupted (%d rows written online)", name, int(live.sum()))


def _take_over(legacy: Path, folder: Path) -> None:
    """The single-file layout's offline/item_embeddings.parquet: its newest row per item becomes a
    carried file; a damaged one (a kill mid-rewrite left 0 bytes) is moved aside."""
    try:
        rows, _ = _read_rows(legacy)
    except Damaged as exc:
        log.warning("%s is unreadable (%s): moved aside as %s; every item is published again by the next "
                    "publish", legacy, exc, legacy.name + DAMAGED)
        _rename(legacy, legacy.with_name(legacy.name + DAMAGED))
        return
    rows = rows.take(_newest_per_item(rows.ids, rows.stamps))
    versions = {}
    for version, stamp in zip(rows.versions, rows.stamps):
        versions[str(version)] = max(versions.get(str(version), 0), int(stamp))
    _write(rows, folder / f"{CARRIED}{int(rows.stamps.max()) if len(rows) else 0:020d}.parquet",
           {VERSIONS: json.dumps(versions).encode()})
    _remove([legacy])
    log.info("took over %s (%d items' newest rows) into %s/", legacy, len(rows), folder)


def _write_online(store, rows: Rows, chunk_size: int = 10_000) -> None:
    if not len(rows):
        return
    frame = rows.frame()
    for start in range(0, len(frame), chunk_size):
        store.write_to_online_store(VIEW, frame.iloc[start:start + chunk_size])


def publish_item_embeddings(store, item_ids: np.ndarray, representation: np.ndarray, attention: np.ndarray,
                            model_version: str, directory: str | Path | None = None,
                            chunk_size: int = 10_000, state: PublishedEmbeddings | None = None) -> int:
    """Publish ``model_version``'s vectors of ``item_ids``: the items whose vectors differ from the
    store's are written online and into ``offline/item_embeddings/<model_version>.parquet``; returns
    how many. ``state``: the caller's PublishedEmbeddings (updated), else the files are read."""
    if not (len(item_ids) == len(representation) == len(attention)):
        raise ValueError("item_ids, representation and attention must have one row per item")
    _check_version(model_version)
    ids = np.asarray(item_ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("item_ids holds an item twice")
    representation = np.asarray(representation, dtype=np.float32).reshape(len(ids), -1)
    attention = np.asarray(attention, dtype=np.float32).reshape(len(ids), -1)
    folder = embeddings_dir(directory)
    state = PublishedEmbeddings() if state is None else state
    with _exclusive(folder):
        _recover(folder, state, store)
        changed = state.changed(ids, representation, attention)
        instant = max(time.time_ns() // 1000, state.latest_instant() + 1)
        rows = Rows(ids[changed], representation[changed], attention[changed],
                    np.full(int(changed.sum()), model_version, dtype=object),
                    np.full(int(changed.sum()), instant, dtype=np.int64))
        target = folder / f"{model_version}.parquet"
        if target.exists():  # the same version published again: its earlier rows stay in its file
            earlier, _ = _read_rows(target)
            rows = _concat(earlier.take(~np.isin(earlier.ids, rows.ids)), rows)
        pending = folder / (target.name + PENDING)
        _write(rows, pending, {PUBLISHED_AT: str(instant).encode()})
        fresh = rows.take(rows.stamps == instant)
        _write_online(store, fresh, chunk_size)
        _rename(pending, target)
        state.merge(rows, target.name)
        state.known[target.name] = {model_version: instant}
    log.info("published %d of %d item embeddings of model %s (the others unchanged)", len(fresh), len(ids),
             model_version)
    return len(fresh)


def _concat(first: Rows, second: Rows) -> Rows:
    def join(a, b):
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.ndim == b.ndim == 2 \
                and (a.shape[1] == b.shape[1] or not len(a)):
            return np.concatenate([a.reshape(len(a), b.shape[1]), b]) if len(a) else b
        return list(a) + list(b)

    return Rows(np.concatenate([first.ids, second.ids]), join(first.representation, second.representation),
                join(first.attention, second.attention), np.concatenate([first.versions, second.versions]),
                np.concatenate([first.stamps, second.stamps]))


def prune_item_embeddings(store, versions: list[str], directory: str | Path | None = None,
                          state: PublishedEmbeddings | None = None) -> int:
    """Remove the files of ``versions`` (the model versions the caller removed); their rows that are
    still some item's newest move to a carried file first. Returns how many version files went."""
    folder = embeddings_dir(directory)
    if not folder.is_dir():
        return 0
    state = PublishedEmbeddings() if state is None else state
    with _exclusive(folder):
        _recover(folder, state, store)
        pruned = [folder / f"{v}.parquet" for v in versions if (folder / f"{v}.parquet").exists()]
        carried = []
        for path in pruned:
            rows, _ = _read_rows(path)
            carried.append(rows.take(np.isin(rows.ids, state.live(path.name))))
        if carried and sum(len(r) for r in carried):
            _carry(folder, state, carried, sources=[p.name for p in pruned])
        _remove(pruned)
        for path in pruned:
            state.forget(path.name)
        _merge_carried(folder, state)
    if pruned:
        log.info("pruned the item embeddings of %d versions", len(pruned))
    return len(pruned)


def _carry(folder: Path, state: PublishedEmbeddings, parts: list[Rows], sources: list[str]) -> str:
    rows = parts[0]
    for part in parts[1:]:
        rows = _concat(rows, part)
    instants = {}
    for source in sources:
        instants.update(state.known.get(source, {}))
    versions = {str(v): instants.get(str(v), int(t)) for v, t in zip(rows.versions, rows.stamps)}
    name = f"{CARRIED}{max(time.time_ns() // 1000, _newest_carried(folder) + 1):020d}.parquet"
    _write(rows, folder / name, {VERSIONS: json.dumps(versions).encode()})
    state.merge(rows, name)
    state.known[name] = versions
    return name


def _newest_carried(folder: Path) -> int:
    names = sorted(p.name for p in folder.glob(f"{CARRIED}*.parquet"))
    return int(names[-1][len(CARRIED):-len(".parquet")]) if names else 0


def _merge_carried(folder: Path, state: PublishedEmbeddings) -> None:
    """Carried files without a live row go; the newest two merge while the newer holds at least half
    as many live rows as the older (size tiers: a row is rewritten O(log n) times in all)."""
    while True:
        names = sorted(p.name for p in folder.glob(f"{CARRIED}*.parquet"))
        empty = [folder / n for n in names if not len(state.live(n))]
        if empty:
            _remove(empty)
            for path in empty:
                state.forget(path.name)
            continue
        if len(names) < 2 or 2 * len(state.live(names[-1])) < len(state.live(names[-2])):
            return
        parts = []
        for name in names[-2:]:
            rows, _ = _read_rows(folder / name)
            parts.append(rows.take(np.isin(rows.ids, state.live(name))))
        _carry(folder, state, parts, sources=names[-2:])
        _remove([folder / n for n in names[-2:]])
        for name in names[-2:]:
            state.forget(name)


class PublishedVersions:
    """version -> the instant its publish completed, from the footers of the complete files under
    ``offline/item_embeddings/`` (serving's question: may version V use a row published by P?).
    Rereads the directory at most once per ``refresh_seconds`` when asked about a version it does
    not know; only new files' footers are read."""

    def __init__(self, directory: str | Path, refresh_seconds: float = 1.0, clock=time.monotonic) -> None:
        self.folder = embeddings_dir(directory)
        self.refresh_seconds, self.clock = refresh_seconds, clock
        self._files: dict[str, dict[str, int]] = {}
        self._instants: dict[str, int] = {}
        self._checked = -float("inf")

    def published_at(self, version: str | None) -> int | None:
        if version is None:
            return None
        if version not in self._instants and self.clock() - self._checked >= self.refresh_seconds:
            self.refresh()
        return self._instants.get(version)

    def refresh(self) -> None:
        self._checked = self.clock()
        try:
            names = {p.name for p in self.folder.glob("*.parquet")}
        except OSError:
            return
        for name in set(self._files) - names:
            del self._files[name]
        for name in names - set(self._files):
            try:
                self._files[name] = _versions_of(self.folder / name, _footer(self.folder / name))
            except Exception:  # gone since the listing, or damaged: the next publish deals with it
                continue
        self._instants = {}
        for versions in self._files.values():
            for version, instant in versions.items():
                self._instants[version] = max(instant, self._instants.get(version, 0))

    def valid_for(self, row_version: str | None, served: str | None) -> bool:
        """Whether a published row of ``row_version`` holds ``served``'s own vectors (module docstring)."""
        if row_version is None or served is None:
            return False
        if row_version == served:
            return True
        served_at = self.published_at(served)
        row_at = self.published_at(row_version)
        return served_at is not None and row_at is not None and row_at < served_at
