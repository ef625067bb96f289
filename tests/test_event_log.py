"""The offline event log as training data, against the real embedded broker, the real ingester and
real local Feast stores: a store is loaded with the past of a data set, the rest is streamed as
events, and the next training's examples are those of the whole data set, each with the features
of its time. MovieLens: ratings, every rating a behaviour, timestamps in seconds. KuaiRand: click
labels, only clicks enter histories, timestamps in milliseconds, a context column."""

import shutil
import subprocess
import sys
import uuid

import numpy as np
import pandas as pd
import pytest

from features import durable
from features.event_log import (MANIFEST, compact_event_log, log_dir, log_parts, read_event_log, read_manifest,
                                stream_interactions, stream_parts)
from features.events import EventProducer, schema_events
from features.ingest import Ingester, ensure_topics
from features.load import load_into_store
from features.store import open_store
from features.training import examples_from_store
from recsys.config import PROJECT_ROOT
from features.examples import build_examples
from features.schema import DatasetSchema
from features.tables import DatasetTables

from .conftest import KUAIRAND_SCHEMA, SYNTHETIC_SCHEMA
from .test_feature_store import assert_same_examples

ML_HISTORY, KUAIRAND_HISTORY = 50, 20


def split_by_time(frame, schema, fraction):
    """(past, future): the rows before the time at ``fraction`` of the data, and the rest. No
    instant is in both, so the past's and the future's order among equal times is the data's."""
    frame = frame.sort_values(schema.timestamp, kind="stable").reset_index(drop=True)
    cut = frame[schema.timestamp].iloc[int(len(frame) * fraction)]
    return frame[frame[schema.timestamp] < cut], frame[frame[schema.timestamp] >= cut]


def stream(broker, store, directory, events, partitions=None, **options):
    """Publish the events, then ingest them until the topic is idle. ``partitions``: create the topic
    with that many first (else the broker's default: batches of its partitions in any order)."""
    name = f"events-{uuid.uuid4().hex[:8]}"
    if partitions:
        ensure_topics({"bootstrap_servers": broker}, name, partitions)
    producer = EventProducer(broker, name)
    producer.send_all(events)
    producer.close()
    ingester = Ingester(broker, store, directory, topic=name, group=name, **options)
    try:
        return ingester.run(stop_after_idle_seconds=2)
    finally:
        ingester.close()


def loaded(tables, past, directory, history_length):
    store = open_store("local", directory)
    load_into_store(store, tables.with_interactions(past), directory, history_length=history_length)
    return store


def histories_are_the_behaviours_strictly_before(examples, frame, schema, user, history_length, streamed_from):
    """For each of ``user``'s examples at or after ``streamed_from``: the history is the user's
    behaviours (loaded or streamed) strictly before it, oldest first, the last ``history_length``."""
    rows = frame[frame[schema.user] == user].sort_values(schema.timestamp, kind="stable")
    if schema.history == "positive":
        rows = rows[rows[schema.label] == 1]
    times, items = rows[schema.timestamp].to_numpy(), rows[schema.item].to_numpy()
    checked = 0
    for i in np.flatnonzero((examples.user_id == user) & (examples.timestamp >= streamed_from)):
        before = items[times < examples.timestamp[i]][-history_length:]
        assert examples.history(i, history_length).tolist() == before.tolist(), i
        checked += 1
    return checked


@pytest.fixture
def movielens_past(ml100k_tables, tmp_path):
    """A store of the first 70% (by time) of 40 MovieLens users' ratings; (store, directory, past, future)."""
    schema = ml100k_tables.schema
    ratings = ml100k_tables.interactions
    past, future = split_by_time(ratings[ratings[schema.user] <= 40], schema, 0.7)
    return loaded(ml100k_tables, past, tmp_path, ML_HISTORY), tmp_path, past, future


def test_movielens_events_streamed_after_the_load_are_the_next_examples(broker, movielens_past, ml100k_tables):
    """The streamed ratings, some sent twice (a producer's retry) and some that repeat loaded rows
    (a replay of the past), become examples once each, with the histories and counts of their
    time: the examples of the whole data set, as the direct loader builds them."""
    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    assert len(examples_from_store(store, directory)) == len(past)  # nothing streamed yet
    events = schema_events(future, schema)
    retried = events[::7]
    replayed = schema_events(past.iloc[::50], schema)  # already in the store
    stream(broker, store, directory, events + retried + replayed, max_batch=100)
    batch_files = len(list(log_dir(directory).glob("batch-*.parquet")))
    assert batch_files > 1

    # without compaction (the code before the event log was training data) nothing streamed is an example
    assert len(examples_from_store(store, directory, compact=False)) == len(past)

    report = compact_event_log(directory)
    assert report.batch_files == batch_files and not list(log_dir(directory).glob("batch-*.parquet"))
    assert report.events_read == len(events) + len(retried) + len(replayed)
    assert report.duplicates == len(retried) and report.log_events == len(events) + len(replayed)
    # the replayed rows are logged (the log is what was sent) and left out of training by the examples
    assert report.stream_interactions == len(future) + len(replayed)
    examples = examples_from_store(store, directory)
    whole = build_examples(ml100k_tables.with_interactions(pd.concat([past, future])).joined(), schema)
    assert_same_examples(examples, whole, ML_HISTORY)

    busiest = future[schema.user].value_counts().index[0]
    first_streamed = int(future[schema.timestamp].min())
    assert histories_are_the_behaviours_strictly_before(
        examples, pd.concat([past, future]), schema, busiest, ML_HISTORY, first_streamed) >= 5


def test_kuairand_events_streamed_after_the_load_are_the_next_examples(broker, kuairand_tables, tmp_path):
    """Impressions with click labels and the tab they were shown in: every streamed impression is an
    example, only the clicked ones enter the histories and counts after it, in milliseconds."""
    schema = kuairand_tables.schema
    impressions = kuairand_tables.interactions
    impressions = impressions[impressions[schema.user] < 60]
    # their users and videos only: materialising the whole catalogue online takes 20 s
    catalogue = DatasetTables(schema, impressions, kuairand_tables.users[kuairand_tables.users[schema.user] < 60],
                              kuairand_tables.items[kuairand_tables.items[schema.item].isin(impressions[schema.item])])
    past, future = split_by_time(impressions, schema, 0.6)
    # a data set's exact duplicate rows are one event (one event id): stream each once
    future = future.drop_duplicates([schema.user, schema.item, schema.timestamp])
    store = loaded(catalogue, past, tmp_path, KUAIRAND_HISTORY)
    stream(broker, store, tmp_path, schema_events(future, schema))
    assert len(examples_from_store(store, tmp_path, compact=False)) == len(past)

    examples = examples_from_store(store, tmp_path)
    whole = build_examples(catalogue.with_interactions(pd.concat([past, future])).joined(), schema)
    assert_same_examples(examples, whole, KUAIRAND_HISTORY)
    assert future[schema.label].nunique() == 2 and len(examples) == len(past) + len(future)

    # a user whose streamed impressions were clicked and not: histories hold the clicks strictly before
    clicked = future.groupby(schema.user)[schema.label].agg(["sum", "count"])
    user = int(clicked[(clicked["sum"] >= 2) & (clicked["count"] > clicked["sum"])].index[0])
    first_streamed = int(future[schema.timestamp].min())
    assert histories_are_the_behaviours_strictly_before(
        examples, pd.concat([past, future]), schema, user, KUAIRAND_HISTORY, first_streamed) >= 3
    # the context column streamed as text comes back as the loaded values
    key = ["user_id", "item_id", "timestamp", "tab"]
    streamed = pd.concat([pd.read_parquet(path) for path in stream_parts(tmp_path)])[key]
    sent = future.rename(columns={schema.item: "item_id", schema.timestamp: "timestamp"})[key]
    assert sorted(streamed.itertuples(index=False)) == sorted(sent.itertuples(index=False))


class Killed(BaseException):
    """A stand-in for SIGKILL: nothing after it runs."""


def frames(directory):
    """What compaction leaves behind: the log, the streamed training rows, and which files remain."""
    streamed = [pd.read_parquet(path) for path in stream_parts(directory)]
    return {"log": read_event_log(directory),
            "stream": pd.concat(streamed, ignore_index=True) if streamed else None,
            "files": sorted(str(p.relative_to(directory)) for folder in ("events", "stream_interactions")
                            for p in (directory / "offline" / folder).rglob("*")
                            if p.is_file() and not p.name.endswith(".tmp"))}


def assert_same_state(state, expected):
    assert state["files"] == expected["files"]
    for name in ("log", "stream"):
        pd.testing.assert_frame_equal(state[name], expected[name], check_dtype=False, obj=name)


def test_compaction_is_idempotent_and_a_kill_anywhere_loses_and_duplicates_nothing(broker, movielens_past,
                                                                                   ml100k_tables, tmp_path_factory,
                                                                                   monkeypatch):
    """Compaction killed after each file it writes (before the first, too): what it left is read as
    the whole log without a duplicate, and the next compaction leaves what an uninterrupted one
    does. Compacting again changes nothing; a second stream appends to the log and rewrites none
    of the files it had."""
    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    first, second = events[:len(events) // 2], events[len(events) // 2:]
    stream(broker, store, directory, first + first[:20], max_batch=40)  # 20 re-sent: in later batch files
    pristine = tmp_path_factory.mktemp("pristine") / "store"
    shutil.copytree(directory, pristine)

    report = compact_event_log(directory)
    assert report.duplicates == 20 and report.log_events == len(first) == report.new_events
    expected = frames(directory)
    dates = {path.parent.name for path in log_parts(directory)}
    assert len(expected["stream"]) == len(first) and len(log_parts(directory)) == len(dates) > 1  # a part per date

    again = compact_event_log(directory)  # idempotent: nothing new, nothing written
    assert (again.batch_files, again.duplicates, again.new_events) == (0, 0, 0)
    assert_same_state(frames(directory), expected)

    writes = len(log_parts(directory)) + 2  # the log's parts, the stream part, the manifest (the commit)
    # killed just before the first rename (its .tmp stays behind), or just after each
    real_replace = durable.durably_replace
    for kill_at in range(-1, writes):
        copy = tmp_path_factory.mktemp(f"killed-{kill_at}") / "store"
        shutil.copytree(pristine, copy)
        done = []

        def replace_then_die(staging, path, kill_at=kill_at, done=done):
            if kill_at == -1:
                raise Killed
            real_replace(staging, path)
            done.append(path.name)
            if len(done) == kill_at + 1:
                raise Killed

        monkeypatch.setattr(durable, "durably_replace", replace_then_die)
        with pytest.raises(Killed):
            compact_event_log(copy)
        monkeypatch.setattr(durable, "durably_replace", real_replace)
        left = read_event_log(copy)  # what a reader sees meanwhile: every event, once
        pd.testing.assert_frame_equal(left, expected["log"], check_dtype=False)
        committed = kill_at == writes - 1
        assert bool(read_manifest(copy)["parts"]) == committed
        if kill_at == writes - 1:  # killed between the commit and deleting the batch files
            done_cli = subprocess.run([sys.executable, "-m", "plexrec.cli", "features", "compact", "--data-dir",
                                       str(copy)], check=False, capture_output=True, text=True, timeout=300,
                                      cwd=PROJECT_ROOT)
            assert done_cli.returncode == 0, done_cli.stderr[-2000:]
            # every event of the batch files left behind is already in the log
            read_twice = f"{len(first) + 20:,}"
            assert f"({read_twice} events, {read_twice} duplicate event ids dropped)" in done_cli.stderr
        else:
            repaired = compact_event_log(copy)
            assert repaired.new_events == len(first) and repaired.orphans_removed == max(kill_at + 1, 1)  # renamed parts, or the .tmp
        assert_same_state(frames(copy), expected)
        assert_same_examples(examples_from_store(open_store("local", copy), copy, compact=False),
                             examples_from_store(store, directory, compact=False), ML_HISTORY)

    written = {path: path.stat().st_mtime_ns for path in log_parts(directory) + stream_parts(directory)}
    stream(broker, store, directory, second + first[:5])  # a later stream, with events logged before
    report = compact_event_log(directory)
    assert report.duplicates == 5 and report.log_events == len(events)
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in written.items())  # appended, not rewritten
    examples = examples_from_store(store, directory)
    whole = build_examples(ml100k_tables.with_interactions(pd.concat([past, future])).joined(), schema)
    assert_same_examples(examples, whole, ML_HISTORY)


def test_a_reload_that_holds_the_streamed_events_counts_each_once(broker, movielens_past, ml100k_tables):
    """`features load` again, of a data set that now holds what was streamed: the logged events that
    are loaded rows (the same user, item and instant) are neither a second example nor a second
    behaviour."""
    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    stream(broker, store, directory, schema_events(future, schema))
    assert compact_event_log(directory).stream_interactions == len(future)
    everything = pd.concat([past, future])
    load_into_store(store, ml100k_tables.with_interactions(everything), directory, history_length=ML_HISTORY)
    assert compact_event_log(directory).new_events == 0
    whole = build_examples(ml100k_tables.with_interactions(everything).joined(), schema)
    assert_same_examples(examples_from_store(store, directory), whole, ML_HISTORY)


def test_logged_events_become_rows_by_the_schemas_rules():
    """The label the ingester gave an event decides the row's label, also in a rating schema where an
    explicit label field overrode the rating or came without one; the timestamp is in the schema's
    unit; context text a categorical integer column cannot hold is missing, not an error; a split
    column's streamed rows are training rows."""
    from features.movielens import movielens_schema

    logged = pd.DataFrame({
        "event_id": ["a", "b", "c", "d"], "user_id": [1, 1, 2, 2], "item_id": [5, 6, 7, 8],
        "event_timestamp": pd.to_datetime([1_000_999, 2_000_000, 3_000_500, 4_000_000], unit="ms", utc=True),
        "value": [5.0, None, 5.0, 2.0], "label": [1, 1, 0, 0],
        "context": ['{"tab": "3"}', '{"tab": "x"}', "{}", '{"tab": "2.0", "device": "tv"}']})
    ratings = stream_interactions(logged, movielens_schema(), {})
    assert ratings["timestamp"].tolist() == [1000, 2000, 3000, 4000]  # seconds, as the ingester converts
    assert ratings["rating"].tolist() == [5.0, 4.0, 3.0, 2.0]  # the value where it agrees with the label
    kuairand = DatasetSchema.from_yaml(KUAIRAND_SCHEMA)
    impressions = stream_interactions(logged, kuairand, {"tab": "Int64"})
    assert impressions["timestamp"].tolist() == [1_000_999, 2_000_000, 3_000_500, 4_000_000]
    assert impressions["is_click"].tolist() == [1, 1, 0, 0]
    assert impressions["tab"].tolist() == [3, pd.NA, pd.NA, 2]
    synthetic = stream_interactions(logged, DatasetSchema.from_yaml(SYNTHETIC_SCHEMA), {})
    assert synthetic["split"].tolist() == ["train"] * 4


def test_a_load_after_streaming_keeps_the_streamed_history_and_the_ingesters_watermarks(
        broker, movielens_past, ml100k_tables):
    """`features load` of the same data set again, after events were streamed: the online history and
    counts still hold the streamed behaviours, and a re-delivery of streamed events changes nothing
    (the ingester's watermarks and event-id windows survive the load)."""
    from .test_ingest import history_of, item_counts

    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    stream(broker, store, directory, events)
    user = int(future[schema.user].value_counts().index[0])
    item = int(future[schema.item].value_counts().index[0])
    streamed_history, streamed_count = history_of(store, user), item_counts(store, [item])[0]
    everything = pd.concat([past, future])
    assert streamed_history[2] == (everything[schema.user] == user).sum()

    load_into_store(store, ml100k_tables.with_interactions(past), directory, history_length=ML_HISTORY)
    assert history_of(store, user) == streamed_history  # not the past's alone
    assert item_counts(store, [item])[0] == streamed_count
    stream(broker, store, directory, events[:200])  # re-sent: the same event ids
    assert history_of(store, user) == streamed_history and item_counts(store, [item])[0] == streamed_count


def test_a_learner_window_read_during_another_compaction_has_the_features_of_its_instants(
        broker, movielens_past, ml100k_tables, monkeypatch):
    """What the learner does (take the events past its offsets, build their examples) while another
    compaction is half done (forced: right after that compaction's first file write): the learner
    sees only committed events, and each of its examples equals that event's example in the whole
    store's (its history, counters and label)."""
    from features.event_log import events_after

    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    stream(broker, store, directory, events[:len(events) // 2])
    compact_event_log(directory)
    stream(broker, store, directory, events[len(events) // 2:])
    real_replace, seen = durable.durably_replace, {}

    def learner_reads_after_the_first_write(staging, path):
        real_replace(staging, path)
        if not seen:
            seen["rows"], _ = events_after(directory, {})
            seen["window"] = examples_from_store(store, directory, compact=False, events=seen["rows"])

    monkeypatch.setattr(durable, "durably_replace", learner_reads_after_the_first_write)
    compact_event_log(directory)  # the competing one
    monkeypatch.setattr(durable, "durably_replace", real_replace)
    window, whole = seen["window"], examples_from_store(store, directory)
    index = {(int(u), int(i), int(t)): n for n, (u, i, t) in enumerate(zip(whole.user_id, whole.item_id,
                                                                            whole.timestamp))}
    assert len(window) == len(seen["rows"]) > 0
    for n in range(len(window)):
        m = index[(int(window.user_id[n]), int(window.item_id[n]), int(window.timestamp[n]))]
        assert window.history(n, ML_HISTORY).tolist() == whole.history(m, ML_HISTORY).tolist(), n
        assert np.allclose(window.dense[n], whole.dense[m]) and window.label[n] == whole.label[m], n


def test_a_backlog_is_appended_a_group_at_a_time(broker, movielens_past, ml100k_tables, monkeypatch):
    """Batch files of more events than one group holds become several committed parts (memory is set
    by the group, not by the backlog), with every event once and the examples of the whole data set:
    an event the log held before (re-sent later, in another group) and one an earlier group of the
    backlog holds are dropped alike."""
    from features import event_log

    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    stream(broker, store, directory, events[:100], max_batch=40)
    assert compact_event_log(directory).new_events == 100
    # 30 of the log's and 30 of the backlog's own re-sent, in later files
    stream(broker, store, directory, events[100:] + events[:30] + events[100:130], max_batch=40)
    monkeypatch.setattr(event_log, "GROUP_EVENTS", 200)
    monkeypatch.setattr(event_log, "MERGE_FANIN", 1 << 30)  # each group's part stays: counted below
    report = compact_event_log(directory)
    assert report.new_events == len(events) - 100 and report.duplicates == 60
    assert len(read_manifest(directory)["parts"]) >= 1 + (len(events) - 100) // 200
    assert len(read_event_log(directory)) == len(events)
    whole = build_examples(ml100k_tables.with_interactions(pd.concat([past, future])).joined(), schema)
    assert_same_examples(examples_from_store(store, directory), whole, ML_HISTORY)


def test_streamed_item_attributes_reach_the_offline_profile_from_their_instant(broker, movielens_past,
                                                                              ml100k_tables, tmp_path_factory):
    """Events carrying item attributes (a new category for one item; a new release year alone for
    another, whose genres stay) become item-profile rows stamped with their instants: every example
    after an instant has the new values and none at or before it (its own event's example included),
    in the whole data set's examples and in a learner's window; the newest profile (what publishing
    reads) and the online one agree; a reload keeps them online."""
    from features.event_log import events_after, item_profiles, stream_item_profile_parts
    from features.example_tables import build_example_tables
    from features.online import OnlineFeatures

    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    counts = future[schema.item].value_counts()
    documentary, restamped = int(counts.index[0]), int(counts.index[1])
    changed_at = {}
    for item, attributes in ((documentary, {"genres": "Documentary"}), (restamped, {"release_year": "2001"})):
        times = future.loc[future[schema.item] == item, schema.timestamp].sort_values()
        at = int(times.iloc[len(times) // 2])  # examples of the item before and after it
        event = next(e for e in events if e.item_id == item and e.event_time_ms == at * 1000)
        event.item_attributes.update(attributes)
        changed_at[item] = at
    before = item_profiles(directory).set_index("item_id")
    assert before.loc[documentary, "item_category"] != "Documentary"
    stream(broker, store, directory, events, max_batch=100)
    report = compact_event_log(directory)
    assert report.item_profile_rows == 2 and len(stream_item_profile_parts(directory)) == 1

    def check(rows: pd.DataFrame) -> int:
        checked = 0
        for item, at in changed_at.items():
            mine = rows[rows["item_id"] == item]
            after = mine["timestamp"] > at
            assert after.any() and (~after).any()
            if item == documentary:
                assert (mine.loc[after, "item_category"] == "Documentary").all()
                assert all(list(g) == ["Documentary"] for g in mine.loc[after, "genres"])
                assert (mine.loc[~after, "item_category"] == before.loc[item, "item_category"]).all()
            else:
                assert (mine.loc[after, "release_year"] == 2001).all()
                assert (mine.loc[~after, "release_year"] == before.loc[item, "release_year"]).all()
                assert (mine["item_category"] == before.loc[item, "item_category"]).all()  # not carried: kept
            checked += len(mine)
        return checked

    tables = build_example_tables(directory / "offline", schema, tmp_path_factory.mktemp("examples"))
    assert check(pd.read_parquet(tables.shard_paths(0)[0])) >= 10
    rows, _ = events_after(directory, {})  # a learner's window: the streamed events alone
    window = build_example_tables(directory / "offline", schema, tmp_path_factory.mktemp("window"), events=rows)
    assert check(pd.read_parquet(window.shard_paths(0)[0])) >= 10
    behaviours = pd.read_parquet(tables.shard_paths(0)[1])  # histories read an item's newest category
    assert (behaviours.loc[behaviours["item_id"] == documentary, "item_category"] == "Documentary").all()

    newest = item_profiles(directory).set_index("item_id")
    assert len(newest) == len(before) and newest.loc[documentary, "item_category"] == "Documentary"
    assert newest.loc[restamped, "release_year"] == 2001
    assert list(newest.loc[restamped, "genres"]) == list(before.loc[restamped, "genres"])
    for reload in (False, True):
        if reload:  # the same past again: materialize writes the loaded rows online, the streamed ones follow
            load_into_store(store, ml100k_tables.with_interactions(past), directory, history_length=ML_HISTORY)
        online = OnlineFeatures(store).items([documentary, restamped])
        for item, features in online.items():
            assert features.category == newest.loc[item, "item_category"], (reload, item)
            assert features.profile["release_year"] == newest.loc[item, "release_year"], (reload, item)
            assert list(features.profile["genres"]) == list(newest.loc[item, "genres"]), (reload, item)


def hold_batch_files(directory, held):
    """Move the log folder's batch files to ``held``; how many."""
    held.mkdir(parents=True, exist_ok=True)
    for batch in log_dir(directory).glob("batch-*.parquet"):
        shutil.move(batch, held / batch.name)
    return len(list(held.glob("batch-*.parquet")))


def compact_each(directory, batches):
    """Compact ``batches`` one at a time (each moved back into the log folder first): many small
    compactions, as a learner polling a steady stream makes them; their reports."""
    reports = []
    for batch in batches:
        shutil.move(batch, log_dir(directory) / batch.name)
        reports.append(compact_event_log(directory))
    return reports


def digit_sum(n, base):
    return 0 if n == 0 else n % base + digit_sum(n // base, base)


def test_many_small_compactions_are_merged_into_logarithmically_many_parts(broker, movielens_past, ml100k_tables,
                                                                           tmp_path_factory, monkeypatch):
    """A compaction per tiny batch file (a learner polling a steady stream): the parts are merged
    (size-tiered: MERGE_FANIN parts of a level into one of the next), so a store of n compactions
    holds the base-MERGE_FANIN digit sum of n parts, not n; the log holds every event once in
    event-time order, and the stream rows with their ordinals, a learner's windows and the examples
    are those of a store whose compactions never merged (every store before merging)."""
    from features import event_log
    from features.event_log import events_after

    store, directory, past, future = movielens_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    stream(broker, store, directory, events, max_batch=6)
    unmerged = tmp_path_factory.mktemp("unmerged") / "store"
    shutil.copytree(directory, unmerged)
    held, held_unmerged = tmp_path_factory.mktemp("held"), tmp_path_factory.mktemp("held-unmerged")
    compactions = hold_batch_files(directory, held)
    hold_batch_files(unmerged, held_unmerged)
    assert compactions >= 150

    monkeypatch.setattr(event_log, "MERGE_FANIN", 1 << 30)  # never: each compaction's part stays
    compact_each(unmerged, sorted(held_unmerged.glob("batch-*.parquet")))
    monkeypatch.setattr(event_log, "MERGE_FANIN", 4)
    reports = compact_each(directory, sorted(held.glob("batch-*.parquet")))
    assert len(read_manifest(unmerged)["parts"]) == compactions
    manifest = read_manifest(directory)
    assert len(manifest["parts"]) == digit_sum(compactions, 4) <= 3 * 4  # 4 ** 4 > compactions
    assert max(part["level"] for part in manifest["parts"].values()) == 3
    assert sum(report.merges for report in reports) == (compactions - digit_sum(compactions, 4)) // 3
    assert sum(part["events"] for part in manifest["parts"].values()) == len(events)

    logged = read_event_log(directory)
    assert len(logged) == len(events) == logged["event_id"].nunique()
    pd.testing.assert_frame_equal(logged, read_event_log(unmerged), check_dtype=False)
    for path in log_parts(directory):  # each file in event-time order
        assert pd.read_parquet(path)["event_timestamp"].is_monotonic_increasing, path
    merged_rows = pd.concat([pd.read_parquet(path) for path in stream_parts(directory)], ignore_index=True)
    unmerged_rows = pd.concat([pd.read_parquet(path) for path in stream_parts(unmerged)], ignore_index=True)
    # in commit order, their ordinals as stored (seqs differ: a merge's files take one), so in one order
    pd.testing.assert_frame_equal(merged_rows.drop(columns="ordinal"), unmerged_rows.drop(columns="ordinal"))
    assert merged_rows["ordinal"].is_unique and merged_rows["ordinal"].is_monotonic_increasing
    assert unmerged_rows["ordinal"].is_monotonic_increasing

    # a learner that took the oldest part (a merge keeps the oldest key): later parts hold later offsets
    oldest = manifest["parts"][min(manifest["parts"], key=int)]
    halfway = {position: int(offset) for position, offset in oldest["offsets"].items()}
    for taken in ({}, halfway):
        window, reached = events_after(directory, taken)
        expected_window, expected_reached = events_after(unmerged, taken)
        pd.testing.assert_frame_equal(window, expected_window)
        assert reached == expected_reached and len(window) > 0
    examples = examples_from_store(store, directory)
    assert_same_examples(examples, examples_from_store(store, unmerged), ML_HISTORY)
    whole = build_examples(ml100k_tables.with_interactions(pd.concat([past, future])).joined(), schema)
    assert_same_examples(examples, whole, ML_HISTORY)

    # a learner's window reads no part whose events are all at or below its offsets (the manifest
    # records each part's highest offset per position): with those parts' files gone, the same window
    taken = [part for part in manifest["parts"].values()
             if all(offset <= halfway.get(position, -1) for position, offset in part["offsets"].items())]
    assert 0 < len(taken) < len(manifest["parts"])
    for part in taken:
        for path in part["log"]:
            (log_dir(directory) / path).rename(log_dir(directory) / path.replace(".parquet", ".away"))
    window, reached = events_after(directory, halfway)
    expected_window, expected_reached = events_after(unmerged, halfway)
    pd.testing.assert_frame_equal(window, expected_window)
    assert reached == expected_reached


def test_a_merged_away_file_stays_readable_until_its_grace_period_ends(broker, movielens_past, ml100k_tables,
                                                                       tmp_path_factory, monkeypatch):
    """A reader that listed the parts before a merge (a training build, a learner window) reads every
    file it listed right after the merge: the merged-away files are retired, not deleted, and no
    compaction takes them for orphans; one after RETIRE_SECONDS deletes them, the log unchanged."""
    from features import event_log
    from features.event_log import stream_item_profile_parts

    store, directory, past, future = movielens_past
    events = schema_events(future, ml100k_tables.schema)
    events[3].item_attributes.update({"release_year": "2001"})  # a streamed item-profile part too
    stream(broker, store, directory, events[:200], partitions=1, max_batch=40)  # events[3] in the first batch
    held = tmp_path_factory.mktemp("held")
    assert hold_batch_files(directory, held) >= 4
    monkeypatch.setattr(event_log, "MERGE_FANIN", 4)
    batches = sorted(held.glob("batch-*.parquet"))
    assert sum(report.merges for report in compact_each(directory, batches[:3])) == 0
    listed = log_parts(directory) + stream_parts(directory) + stream_item_profile_parts(directory)
    assert len(stream_item_profile_parts(directory)) == 1
    report = compact_each(directory, batches[3:4])[0]
    assert report.merges == 1 and len(read_manifest(directory)["parts"]) == 1
    logged = read_event_log(directory)
    for path in listed:  # what the reader listed: every file there, whole
        assert len(pd.read_parquet(path)) > 0, path
    retired = [directory / "offline" / path for entry in read_manifest(directory)["retired"] for path in entry["paths"]]
    assert len(retired) == report.files_retired and set(listed) < set(retired)
    again = compact_event_log(directory)  # within the grace period: neither orphans nor deleted
    assert (again.orphans_removed, again.retired_removed) == (0, 0) and all(path.exists() for path in retired)

    monkeypatch.setattr(event_log, "RETIRE_SECONDS", 0)  # the grace period over
    late = compact_event_log(directory)
    assert late.retired_removed == len(retired) and not any(path.exists() for path in retired)
    assert read_manifest(directory)["retired"] == [] and compact_event_log(directory).orphans_removed == 0
    pd.testing.assert_frame_equal(read_event_log(directory), logged)
    assert len(logged) == logged["event_id"].nunique() == sum(len(pd.read_parquet(path)) for path in
                                                              log_parts(directory))


def test_a_merge_killed_before_its_commit_loses_and_duplicates_nothing(broker, movielens_past, ml100k_tables,
                                                                       tmp_path_factory, monkeypatch):
    """A merge killed after any of its files, or at its manifest (the commit): readers see the unmerged
    parts, every event once; the next compaction deletes the merged files as orphans and merges
    again, leaving what an uninterrupted merge does."""
    from features import event_log

    store, directory, past, future = movielens_past
    events = schema_events(future, ml100k_tables.schema)
    stream(broker, store, directory, events[:300], max_batch=40)
    held = tmp_path_factory.mktemp("held")
    assert hold_batch_files(directory, held) >= 4
    monkeypatch.setattr(event_log, "MERGE_FANIN", 4)
    batches = sorted(held.glob("batch-*.parquet"))[:4]
    compact_each(directory, batches[:3])
    shutil.move(batches[3], log_dir(directory) / batches[3].name)
    pristine = tmp_path_factory.mktemp("pristine") / "store"
    shutil.copytree(directory, pristine)
    assert compact_event_log(directory).merges == 1
    expected = frames(directory)
    merged_files = len(read_manifest(directory)["parts"]["0"]["log"]) + 1  # its log files, its stream part
    real_replace, real_write_text = durable.durably_replace, event_log.write_text

    for kill_at in [*range(merged_files), "commit"]:  # right after each merged file, or at the commit
        copy = tmp_path_factory.mktemp(f"killed-{kill_at}") / "store"
        shutil.copytree(pristine, copy)

        def replace_then_die(staging, path, kill_at=kill_at, seen={"commits": 0, "files": 0}):
            real_replace(staging, path)
            if path.name == MANIFEST:
                seen["commits"] += 1
            elif seen["commits"] == 1:  # the append committed: the merge's files
                seen["files"] += 1
                if seen["files"] == kill_at + 1:
                    raise Killed

        def commit_then_die(text, path, calls=[]):
            calls.append(path)
            if len(calls) == 2:  # the append's commit went through; the merge's is killed
                raise Killed
            real_write_text(text, path)

        if kill_at == "commit":
            monkeypatch.setattr(event_log, "write_text", commit_then_die)
        else:
            monkeypatch.setattr(durable, "durably_replace", replace_then_die)
        with pytest.raises(Killed):
            compact_event_log(copy)
        monkeypatch.setattr(durable, "durably_replace", real_replace)
        monkeypatch.setattr(event_log, "write_text", real_write_text)
        assert len(read_manifest(copy)["parts"]) == 4  # the merge did not commit
        pd.testing.assert_frame_equal(read_event_log(copy), expected["log"], check_dtype=False)  # each once
        repaired = compact_event_log(copy)
        assert repaired.orphans_removed == (kill_at + 1 if kill_at != "commit" else merged_files)
        assert repaired.merges == 1 and repaired.new_events == 0
        assert_same_state(frames(copy), expected)
        assert_same_examples(examples_from_store(store, copy, compact=False),
                             examples_from_store(store, directory, compact=False), ML_HISTORY)
