"""The ingester's offline event log against the real embedded broker and a real local Feast store:
its batch files are on disk before their offsets are committed."""

import os

from features.events import make_event
from features.ingest import Ingester
from tests.test_ingest import RATING, empty_store, movielens_catalogue, publish, topic  # noqa: F401 (fixtures)


def test_a_batch_file_is_on_disk_before_its_offsets_are_committed(broker, empty_store, monkeypatch):  # noqa: F811
    """Every batch file that exists when the ingester commits offsets was fsynced (its contents),
    renamed, and its directory fsynced (its name) before that commit: Kafka will not deliver a
    committed batch again, so a power loss after the commit must not lose its file. What this
    checks is the order of the calls (fsync of the file, of the directory, then the commit), not
    a real power loss."""
    store, directory = empty_store
    events_dir = directory / "offline" / "events"
    name = topic()
    events = [make_event(user_id=1 + i % 5, item_id=100 + i, event_type=RATING, value=4.0,
                         event_time_ms=1_700_000_000_000 + 1000 * i) for i in range(300)]
    publish(broker, name, events)
    calls: list[tuple[str, object]] = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    real_replace = os.replace

    def replace(source, target):
        calls.append(("replace", (str(source), str(target))))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ingester = Ingester(broker, store, directory, topic=name, group=name, max_batch=100)
    real_commit = ingester.consumer.commit

    def commit(*args, **kwargs):
        calls.append(("commit", sorted(str(p) for p in events_dir.glob("batch-*.parquet"))))
        return real_commit(*args, **kwargs)

    ingester.consumer.commit = commit
    try:
        ingester.run(stop_after_idle_seconds=3)
    finally:
        ingester.close()
    commits = [files for kind, files in calls if kind == "commit"]
    assert commits and commits[-1], "the ingester committed no batch with a batch file"
    synced: set[str] = set()  # staging files fsynced
    renamed: set[str] = set()  # final names of fsynced staging files, renamed since
    durable: set[str] = set()  # ... and whose directory was fsynced after the rename
    for kind, what in calls:
        if kind == "fsync" and str(what).endswith(".parquet.tmp"):
            synced.add(str(what))
        elif kind == "replace" and what[0] in synced:
            renamed.add(what[1])
        elif kind == "fsync" and what == str(events_dir):
            durable |= renamed
        elif kind == "commit":
            assert set(what) <= durable, f"committed before these batch files were durable: {set(what) - durable}"
