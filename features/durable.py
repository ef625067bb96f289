"""Files that are whole or absent: written under a temporary name, fsynced, renamed into place, and
the folder fsynced, so a reader (or a process after a crash) sees the old file or the new one; and
the lock one writer of a folder holds at a time. The event log, the load, the ingester's batch
files and the published embeddings all write this way."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    frame.to_parquet(staging, index=False)
    durably_replace(staging, path)


def write_text(text: str, path: Path) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    durably_replace(staging, path)


def durably_replace(staging: Path, path: Path) -> None:
    """Rename over ``path``, on disk before the caller goes on (it may delete what the file replaces)."""
    with staging.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(staging, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Put a folder's entries (a rename, a deletion) on disk."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def exclusive(lock_path: Path):
    """Hold ``lock_path`` (created) exclusively for the block."""
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, and by the kernel if the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
