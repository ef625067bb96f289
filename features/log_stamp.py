"""Which files of the offline event log were logged into a store of another schema.

The ingester stamps every row of every batch file it writes with the schema fingerprint of
the store it ingests into (store.json ``schema_fingerprint``), in the column
``schema_fingerprint``. Loading another data set into the same data directory (another
schema: another fingerprint) leaves the old stream's files in ``offline/events/``, where
they would otherwise become the new data set's training rows. ``foreign_log_files`` names
them, so that the load and the compaction can refuse or archive them.

A file logged before the stamp existed has no such column: nobody can tell which schema it
was logged under, so it counts as foreign unless the caller says otherwise
(``unstamped_foreign=False``). A compacted file holds the rows of many batch files: it is
foreign when any of its rows is.

Cost: the Parquet footer's column statistics answer for a file whose row groups carry one
fingerprint each (the ingester's files, one value per file); only a file with several
(a compacted one mixing stores) has its fingerprint column read. No torch, no Feast.
"""

from __future__ import annotations

from pathlib import Path

from features.schema import DatasetSchema
from features.store import read_store_meta

STAMP_COLUMN = "schema_fingerprint"


def store_fingerprint(directory: str | Path) -> str:
    """The schema fingerprint of the store loaded in ``directory`` (store.json)."""
    meta = read_store_meta(directory)
    fingerprint = meta.get("schema_fingerprint")
    if fingerprint:
        return str(fingerprint)
    # store.json of a plexrec that did not record it
    return DatasetSchema.from_dict(meta["schema"], where="store.json schema").fingerprint()


def file_fingerprints(path: str | Path) -> set[str | None]:
    """The schema fingerprints the rows of one log file were stamped with; None for unstamped rows
    (a file without the column, or null cells)."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if STAMP_COLUMN not in names:
        return {None} if file.metadata.num_rows else set()
    column = names.index(STAMP_COLUMN)
    found: set[str | None] = set()
    for group in range(file.metadata.num_row_groups):
        chunk = file.metadata.row_group(group).column(column)
        stats = chunk.statistics
        if chunk.num_values == 0:
            continue
        if stats is not None and stats.has_min_max and stats.min == stats.max and stats.null_count == 0:
            found.add(stats.min.decode() if isinstance(stats.min, bytes) else str(stats.min))
        else:  # several values in one row group, or no statistics: read the column
            values = file.read_row_group(group, columns=[STAMP_COLUMN]).column(0).unique().to_pylist()
            found.update(values)
    return found


def log_files(directory: str | Path) -> list[Path]:
    """Every Parquet file of the offline event log (batch files and compacted ones, at any depth
    under ``offline/events/``), not the half-written ``.tmp`` ones."""
    events = Path(directory) / "offline" / "events"
    if not events.is_dir():
        return []
    return sorted(p for p in events.rglob("*.parquet") if p.is_file())


def foreign_log_files(directory: str | Path, unstamped_foreign: bool = True) -> list[Path]:
    """The event log files of ``directory`` holding rows stamped with another schema's fingerprint
    than the store's (and, with ``unstamped_foreign``, rows without a stamp), oldest name first.
    A file deleted while this runs (a compaction folded it) is left out."""
    mine = store_fingerprint(directory)
    foreign = []
    for path in log_files(directory):
        try:
            stamps = file_fingerprints(path)
        except FileNotFoundError:
            continue
        if any(stamp != mine and (stamp is not None or unstamped_foreign) for stamp in stamps):
            foreign.append(path)
    return foreign
