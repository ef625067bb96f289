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
    fsync_path(staging)
    os.replace(staging, path)
    fsync_dir(path.parent)


def fsync_path(path: Path) -> None:
    """Put a file's contents, or a folder's entries (a rename, a deletion), on disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


fsync_dir = fsync_path


def fsync_tree(root: Path) -> None:
    """Put every file under ``root`` and every folder of it on disk: before a folder written whole
    (a model version, a checkpoint) is renamed into place, so the rename never names missing data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


class HeldByAnother(RuntimeError):
    """A lock another process holds; ``pid`` is the one it wrote into the lock file (None if unreadable)."""

    def __init__(self, lock_path: Path, pid: int | None) -> None:
        super().__init__(f"{lock_path} is held by process {pid if pid is not None else '(unknown pid)'}")
        self.lock_path, self.pid = lock_path, pid


def hold_exclusive(lock_path: Path):
    """Take ``lock_path`` (created) exclusively without waiting, write this process's pid into it, and
    return the open file: the lock lasts until it is closed (or the process dies). HeldByAnother, naming
    the holder's pid, when another open file holds it."""
    lock = lock_path.open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        text = lock.read().strip()
        lock.close()
        raise HeldByAnother(lock_path, int(text) if text.isdigit() else None) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


@contextmanager
def exclusive(lock_path: Path):
    """Hold ``lock_path`` (created) exclusively for the block."""
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, and by the kernel if the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
