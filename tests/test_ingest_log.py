"""The ingester's offline event log against the real embedded broker and real local Feast stores:
its batch files are on disk before their offsets are committed, every row carries the store's
schema fingerprint, and an event id means the same online as in the log (its first delivery)."""

import os

from features.events import make_event
from features.ingest import Ingester
from tests.test_ingest import (RATING, empty_store, kuairand_store, movielens_catalogue,  # noqa: F401 (fixtures)
                               publish, topic)


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
    from features.tables import DatasetTables
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


def test_an_event_id_is_immutable_its_first_delivery_wins_online_and_offline(broker, kuairand_store, caplog):  # noqa: F811
    """KuaiRand (history: positive). An id first delivered as an unclicked impression, then re-sent as
    a click (in a later batch, or in the same one): no behaviour, no count, as the offline log (its
    first logging: label 0) says. The other way round (click, then impression): the click counts once.
    A plain retry (same id, same label) is a duplicate, not a conflict. Dropped ids are counted and
    logged at WARNING."""
    from features.event_log import read_event_log
    from tests.test_ingest import CLICK, IMPRESSION, history_of, item_counts, run_ingester

    store, directory, tables = kuairand_store
    user = 297
    items = [40, 41, 42, 43]
    before, counts_before = history_of(store, user), item_counts(store, items)
    base = int(tables.interactions.time_ms.max()) + 120_000
    seen_then_clicked = make_event(user, 40, IMPRESSION, base + 1, label=0)
    clicked_then_seen = make_event(user, 41, IMPRESSION, base + 2, label=1)
    same_batch = make_event(user, 42, IMPRESSION, base + 3, label=0)
    name = topic()
    publish(broker, name, [seen_then_clicked, clicked_then_seen, same_batch,
                           make_event(user, 42, CLICK, base + 4, event_id=same_batch.event_id)])
    first = run_ingester(broker, store, directory, name)
    later = [make_event(user, 40, CLICK, base + 5, event_id=seen_then_clicked.event_id),
             make_event(user, 41, IMPRESSION, base + 6, label=0, event_id=clicked_then_seen.event_id),
             make_event(user, 41, IMPRESSION, base + 2, label=1, event_id=clicked_then_seen.event_id),  # a retry
             make_event(user, 43, CLICK, base + 7)]
    publish(broker, name, later)
    with caplog.at_level("WARNING", logger="plexrec.ingest"):
        second = run_ingester(broker, store, directory, name)

    assert first.conflicting_event_ids == 1 and second.conflicting_event_ids == 2
    assert second.duplicate_event_ids == 1 and first.applied + second.applied == 2
    assert "first delivered with another label" in caplog.text
    items_now, stamps_now, count_now = history_of(store, user)
    assert (items_now, count_now) == ((before[0] + [41, 43])[-20:], before[2] + 2)
    assert item_counts(store, items) == [c if n == 0 else (c or 0) + n
                                         for c, n in zip(counts_before, [0, 1, 0, 1])]
    logged = read_event_log(directory).set_index("event_id")
    assert [logged.loc[e.event_id, "label"] for e in (seen_then_clicked, clicked_then_seen, same_batch)] == [0, 1, 0]
    assert logged.loc[later[-1].event_id, "label"] == 1
