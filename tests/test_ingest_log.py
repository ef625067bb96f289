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


def test_the_log_is_stamped_with_the_stores_schema_and_another_stores_files_are_named(
        broker, empty_store, movielens_catalogue):  # noqa: F811
    """Every logged row carries the fingerprint of the schema of the store it was ingested into.
    Another schema is loaded into the same directory while an ingester started before the load
    runs on: foreign_log_files names what that ingester logs afterwards (the old schema's), and a
    file logged before the stamp existed, not what an ingester of the new store logs."""
    import dataclasses

    import pandas as pd

    from features.load import load_into_store
    from features.log_stamp import STAMP_COLUMN, foreign_log_files, log_files, store_fingerprint
    from features.store import read_store_meta
    from recsys.data.tables import DatasetTables
    from tests.test_ingest import PLACEHOLDER_ID, run_ingester

    store, directory = empty_store
    first_fingerprint = read_store_meta(directory)["schema_fingerprint"]
    name = topic()
    publish(broker, name, [make_event(user_id=1, item_id=100 + i, event_type=RATING, value=4.0,
                                      event_time_ms=1_700_000_000_000 + i) for i in range(20)])
    run_ingester(broker, store, directory, name)
    assert log_files(directory)
    for path in log_files(directory):
        assert set(pd.read_parquet(path)[STAMP_COLUMN]) == {first_fingerprint}
    assert foreign_log_files(directory) == []

    # an ingester of this store starts; then another schema is loaded into the same directory
    # (MovieLens, only ratings of 4+ enter histories)
    late = topic()
    running_before = Ingester(broker, store, directory, topic=late, group=late)
    other = dataclasses.replace(movielens_catalogue.schema, history="positive")
    placeholder = pd.DataFrame({"user_id": [PLACEHOLDER_ID], "item_id": [PLACEHOLDER_ID], "rating": [5],
                                "timestamp": [1]})
    load_into_store(store, DatasetTables(other, placeholder, movielens_catalogue.users, movielens_catalogue.items),
                    directory, history_length=200)
    assert store_fingerprint(directory) == other.fingerprint() != first_fingerprint
    before = set(log_files(directory))
    publish(broker, late, [make_event(user_id=3, item_id=300 + i, event_type=RATING, value=5.0,
                                      event_time_ms=1_700_000_200_000 + i) for i in range(5)])
    try:
        running_before.run(stop_after_idle_seconds=3)
    finally:
        running_before.close()
    old_stream = sorted(set(log_files(directory)) - before)
    assert old_stream and all(set(pd.read_parquet(p)[STAMP_COLUMN]) == {first_fingerprint} for p in old_stream)
    unstamped = directory / "offline" / "events" / "batch-1-p0-o0.parquet"  # as an older ingester logged
    pd.read_parquet(old_stream[0]).drop(columns=[STAMP_COLUMN]).to_parquet(unstamped, index=False)
    name = topic()
    publish(broker, name, [make_event(user_id=2, item_id=200 + i, event_type=RATING, value=5.0,
                                      event_time_ms=1_700_000_100_000 + i) for i in range(5)])
    run_ingester(broker, store, directory, name)
    new_stream = sorted(set(log_files(directory)) - before - set(old_stream) - {unstamped})
    assert new_stream and all(set(pd.read_parquet(p)[STAMP_COLUMN]) == {other.fingerprint()} for p in new_stream)
    assert foreign_log_files(directory) == sorted([*old_stream, unstamped])
    assert foreign_log_files(directory, unstamped_foreign=False) == old_stream
    # a compacted file mixing both stores' rows is foreign (its column is read, not just its statistics)
    mixed = directory / "offline" / "events" / "compacted.parquet"
    pd.concat([pd.read_parquet(p) for p in [*old_stream, *new_stream]]).to_parquet(mixed, index=False)
    assert mixed in foreign_log_files(directory)
    mixed.unlink()
