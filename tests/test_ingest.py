"""The stream ingester against the real embedded broker and real local Feast stores: a MovieLens one
(ratings, every rating a behaviour, timestamps in seconds) and a KuaiRand one (click labels, clicks
only enter histories, timestamps in milliseconds, ids from 0)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer

from features.events import (EventProducer, InvalidEvent, check_against_schema, decode_event, is_behaviour,
                             make_event, replay_events, schema_events, stored_item_attributes,
                             unknown_context_keys)
from features.event_log import read_event_log
from features.ingest import IngestError, Ingester, history_length_of
from features.load import load_into_store
from features.store import StoreError, open_store, read_store_meta
from protos.plexrec.v1.events_pb2 import EventType, UserEvent
from recsys.config import PROJECT_ROOT
from features.movielens import movielens_schema, movielens_tables
from features.schema import DatasetSchema
from features.tables import DatasetTables
from features.datasets import read_tables

RATING, IMPRESSION, CLICK = EventType.EVENT_TYPE_RATING, EventType.EVENT_TYPE_IMPRESSION, EventType.EVENT_TYPE_CLICK
KUAIRAND_SCHEMA = PROJECT_ROOT / "data" / "kuairand-pure" / "schema.yaml"
PLACEHOLDER_ID = 10 ** 9  # a store loads at least one interaction: this user and item, which no test uses
KUAIRAND_HISTORY = 20  # shorter than the ingester's former default (200): the store's length must win


@pytest.fixture(scope="module")
def movielens_catalogue():
    return movielens_tables(movielens_schema())


@pytest.fixture
def empty_store(tmp_path, movielens_catalogue):
    """A MovieLens store (its users and movies) without interactions of the ids the tests use."""
    placeholder = pd.DataFrame({"user_id": [PLACEHOLDER_ID], "item_id": [PLACEHOLDER_ID], "rating": [5],
                                "timestamp": [1]})
    store = open_store("local", tmp_path)
    load_into_store(store, movielens_catalogue.with_interactions(placeholder), tmp_path, history_length=200)
    return store, tmp_path


@pytest.fixture(params=["local", "redis"])
def any_store(request, tmp_path, movielens_catalogue):
    """empty_store's data on SQLite, then on a Redis of its own: (store, directory, profile flags)."""
    from features.redis_server import local_redis_server

    placeholder = pd.DataFrame({"user_id": [PLACEHOLDER_ID], "item_id": [PLACEHOLDER_ID], "rating": [5],
                                "timestamp": [1]})
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(local_redis_server()) if request.param == "redis" else None
        store = open_store(request.param, tmp_path, redis_url)
        load_into_store(store, movielens_catalogue.with_interactions(placeholder), tmp_path, history_length=200)
        flags = ["--profile", "redis", "--redis-url", redis_url] if redis_url else []
        yield store, tmp_path, flags


@pytest.fixture(scope="module")
def kuairand_store(tmp_path_factory):
    """A KuaiRand-Pure store of its users with id < 300 (their impressions and profiles) and every video.
    Shared by the KuaiRand tests: each uses users and items of its own, or reads the state first."""
    schema = DatasetSchema.from_yaml(KUAIRAND_SCHEMA)
    tables = read_tables(schema)
    few = DatasetTables(schema, tables.interactions[tables.interactions.user_id < 300].reset_index(drop=True),
                        tables.users[tables.users.user_id < 300].reset_index(drop=True), tables.items)
    directory = tmp_path_factory.mktemp("kuairand")
    store = open_store("local", directory)
    load_into_store(store, few, directory, history_length=KUAIRAND_HISTORY)
    return store, directory, few


def topic() -> str:
    return f"events-{uuid.uuid4().hex[:8]}"


def publish_random_events(broker, name, count, users, items, seed):
    """``count`` rating events of random users and items at random times, published to ``name``."""
    rng = np.random.default_rng(seed)
    events = [make_event(user_id=int(rng.integers(1, users)), item_id=int(rng.integers(1, items)), event_type=RATING,
                         event_time_ms=1_700_000_000_000 + int(rng.integers(0, 10 ** 8)),
                         value=float(rng.integers(1, 6))) for _ in range(count)]
    producer = EventProducer(broker, name)
    producer.send_all(events)
    producer.close()
    return events


def ingest_command(broker, name, directory, idle_seconds, flags=()):
    command = [sys.executable, "-m", "features.ingest", "--bootstrap-servers", broker, "--topic", name,
               "--group", name, "--data-dir", str(directory), "--stop-after-idle", str(idle_seconds), *flags]
    return command, {**os.environ, "PYTHONPATH": os.getcwd()}


def expected_state(events, history_length=200):
    """Ground truth per user: items in event-time order (ties: send order), the last N, the count."""
    per_user = defaultdict(list)
    for sent, event in enumerate(events):
        per_user[event.user_id].append((event.event_time_ms // 1000, sent, event.item_id))
    return {user: ([item for _, _, item in sorted(rows)][-history_length:], len(rows))
            for user, rows in per_user.items()}


def online_state(store, users):
    table = store.get_online_features(
        features=["user_history:history_item_ids", "user_history:interaction_count"],
        entity_rows=[{"user_id": u} for u in users]).to_dict()
    return {u: (list(table["history_item_ids"][i] or []), table["interaction_count"][i] or 0)
            for i, u in enumerate(users)}


def item_counts_match(store, events) -> bool:
    """Every item's online interaction count equals its number of events."""
    truth = defaultdict(int)
    for event in events:
        truth[event.item_id] += 1
    items = sorted(truth)
    counts = store.get_online_features(features=["item_counters:interaction_count"],
                                       entity_rows=[{"item_id": i} for i in items]).to_dict()["interaction_count"]
    return dict(zip(items, counts)) == dict(truth)


def test_events_become_histories_and_counts(broker, empty_store, caplog):
    """MovieLens (history: all): every rating is a behaviour, low ones too, and so is an impression
    that carries a label; an event the schema cannot label (no rating) is a dead letter."""
    store, directory = empty_store
    name = topic()
    base = 1_700_000_000_000
    events = [make_event(user_id=1 + i % 3, item_id=100 + i, event_type=RATING, event_time_ms=base + 1000 * (i % 7),
                         value=float(1 + i % 5)) for i in range(60)]
    events.append(make_event(user_id=1, item_id=5, event_type=IMPRESSION, event_time_ms=base, label=0))
    unlabelled = make_event(user_id=1, item_id=6, event_type=IMPRESSION, event_time_ms=base)  # no rating, no label
    producer = EventProducer(broker, name)
    producer.send_all([*events, unlabelled])
    producer.close()
    ingester = Ingester(broker, store, directory, topic=name, group=name)
    with caplog.at_level("INFO", logger="plexrec.ingest"):
        stats = ingester.run(stop_after_idle_seconds=3, progress_seconds=0.5)
    ingester.close()
    assert re.search(r"last \d+ s: \d+ events \(\d+/s\), \d+ applied", caplog.text)  # progress was logged
    assert online_state(store, [1, 2, 3]) == expected_state(events)
    assert stats.events == 62 and stats.applied == 61 and stats.item_deltas == 61 and stats.dead_letters == 1
    assert stats.reasons == {"value": 1}
    counts = store.get_online_features(features=["item_counters:interaction_count"],
                                       entity_rows=[{"item_id": 100}, {"item_id": 5}, {"item_id": 6}]).to_dict()
    assert counts["interaction_count"] == [1, 1, None]
    logged = read_event_log(directory)
    assert len(logged) == 61
    assert logged.set_index("event_id")["label"].to_dict() == {
        e.event_id: int(e.label if e.HasField("label") else e.value >= 4) for e in events}


def test_validation_names_what_is_wrong():
    good = make_event(user_id=7, item_id=3)
    assert decode_event(b"7", good.SerializeToString()).item_id == 3
    zero = decode_event(b"0", make_event(user_id=0, item_id=0).SerializeToString())  # KuaiRand's ids start at 0
    assert zero.HasField("user_id") and zero.user_id == 0 and zero.item_id == 0
    for key, value, reason in [
        (b"7", b"\xff\xff\xff", "not a plexrec.v1.UserEvent"),
        (b"7", make_event(user_id=7, item_id=-3).SerializeToString(), r"item_id must be an id >= 0, got -3"),
        (b"0", make_event(user_id=None, item_id=3).SerializeToString(), "user_id is missing"),
        (b"7", make_event(user_id=7, item_id=None).SerializeToString(), "item_id is missing"),
        (b"7", make_event(user_id=7, item_id=3, label=2).SerializeToString(), "label must be 0 or 1, got 2"),
        (b"7", make_event(user_id=7, item_id=3, value=float("nan")).SerializeToString(), "value must be a finite"),
        (b"8", good.SerializeToString(), "is not the user_id 7"),
        (b"7", make_event(user_id=7, item_id=3, event_time_ms=int(time.time() * 1000) + 10 ** 10)
         .SerializeToString(), "in the future"),
        (b"7", make_event(user_id=7, item_id=3, context={"k": "v" * 1000}).SerializeToString(), "longer than 256"),
    ]:
        with pytest.raises(InvalidEvent, match=reason):
            decode_event(key, value)


def test_fuzzed_messages_land_in_the_dead_letter_topic_and_the_stream_goes_on(broker, empty_store):
    store, directory = empty_store
    name = topic()
    rng = np.random.default_rng(0)
    raw = KafkaProducer(bootstrap_servers=broker)
    bad = []
    for i in range(40):
        kind = i % 5
        if kind == 0:
            key, value = b"9", bytes(rng.integers(0, 256, 30, dtype=np.uint8))
        elif kind == 1:
            key, value = b"9", make_event(user_id=9, item_id=None).SerializeToString()  # missing item id
        elif kind == 2:
            key, value = b"-4", make_event(user_id=-4, item_id=2).SerializeToString()
        elif kind == 3:
            key, value = b"9", make_event(user_id=9, item_id=2, event_id="x" * 500).SerializeToString()
        else:
            key, value = b"9", b'{"user_id": 9, "item_id": 2}'
        try:
            decode_event(key, value)
            continue  # random bytes can decode as a valid event; not a bad message then
        except InvalidEvent:
            bad.append(value)
        raw.send(name, key=key, value=value)
    good = [make_event(user_id=9, item_id=1000 + i, event_type=RATING, value=3.0) for i in range(5)]
    for event in good:
        raw.send(name, key=b"9", value=event.SerializeToString())
    raw.flush()
    raw.close()

    ingester = Ingester(broker, store, directory, topic=name, group=name)
    stats = ingester.run(stop_after_idle_seconds=3)
    ingester.close()
    assert stats.dead_letters == len(bad) and stats.applied == 5
    assert online_state(store, [9])[9] == ([e.item_id for e in good], 5)
    consumer = KafkaConsumer(name + ".dead-letter", bootstrap_servers=broker, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    letters = list(consumer)
    consumer.close()
    assert sorted(m.value for m in letters) == sorted(bad)
    assert all(dict(m.headers)["reason"] for m in letters)
    assert {dict(m.headers)["source_topic"] for m in letters} == {name.encode()}


def test_sigkill_mid_stream_loses_and_duplicates_nothing(broker, any_store):
    """20,000 events; the ingester process is killed with SIGKILL three times and restarted."""
    store, directory, flags = any_store
    name = topic()
    events = publish_random_events(broker, name, 20_000, users=400, items=5000, seed=1)
    command, env = ingest_command(broker, name, directory, idle_seconds=4, flags=flags)
    rng = np.random.default_rng(1)
    def logged() -> int:  # events in the offline log, re-deliveries included
        return sum(len(pd.read_parquet(f)) for f in (directory / "offline" / "events").glob("*.parquet"))

    progress = []
    for _ in range(3):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = logged()
        while logged() - before < 1500:  # killed mid-stream, once it has made progress
            assert process.poll() is None, "the ingester exited before it was killed"
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0, 0.5)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        progress.append(logged())
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    truth = expected_state(events)
    assert progress[-1] < 20_000 or len(set(progress)) == 3  # three kills, each after some progress
    assert online_state(store, sorted(truth)) == truth
    assert item_counts_match(store, events)
    log = read_event_log(directory)
    assert len(log) == 20_000 and set(log["event_id"]) == {e.event_id for e in events}


def test_an_event_id_seen_before_changes_nothing_online(broker, any_store):
    """Producer retries and a replay run twice: the same event ids again, at new offsets, some in
    the same batch as their first copy. Online, each event counts once, for its user and its item,
    and the deduplicated offline log tells the same story. On SQLite and on Redis."""
    store, directory, flags = any_store
    name = topic()
    rng = np.random.default_rng(3)
    events = [make_event(user_id=int(rng.integers(1, 30)), item_id=int(rng.integers(1, 50)), event_type=RATING,
                         value=4.0, event_time_ms=1_700_000_000_000 + 1000 * i) for i in range(600)]
    retried = [events[i] for i in rng.choice(len(events), 150, replace=False)]
    publish(broker, name, events[:300] + retried[:50] + events[300:] + retried[50:])
    command, env = ingest_command(broker, name, directory, idle_seconds=3, flags=flags)
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    publish(broker, name, events)  # replayed
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]

    truth = expected_state(events)
    assert online_state(store, sorted(truth)) == truth
    assert item_counts_match(store, events)
    assert "(150 by event id)" in first.stderr and "(600 by event id)" in second.stderr
    logged = read_event_log(directory).sort_values("event_timestamp", kind="stable")
    assert len(logged) == 600
    from_log = {user: (rows.item_id.tolist(), len(rows)) for user, rows in logged.groupby("user_id")}
    assert from_log == truth


def row_stamps(store, user, item):
    """The stamps (µs) the ingester wrote on ``user``'s history row and ``item``'s counters row."""
    user_row = store.get_online_features(features=["user_history:stamp_us"],
                                         entity_rows=[{"user_id": user}]).to_dict()
    item_row = store.get_online_features(features=["item_counters:stamp_us"],
                                         entity_rows=[{"item_id": item}]).to_dict()
    return user_row["stamp_us"][0], item_row["stamp_us"][0]


def test_a_row_stamped_by_a_clock_ahead_still_takes_later_writes(broker, any_store):
    """An ingester on a host whose clock runs an hour ahead writes a user's and an item's rows;
    the next one, on a correct clock, stamps its writes before theirs. Feast's Redis store drops a
    write stamped at or before the row's stamp, so the stamps must stay monotone per row.

    SQLite takes every write whatever its stamp, so on [local] the rows' contents would be right
    even with stamps going backwards: there the test stands on the stored stamps themselves (each
    later write stamped after the row's, though the writer's clock is an hour behind it)."""
    store, directory, _ = any_store
    name = topic()
    ahead = [make_event(user_id=5, item_id=7, event_type=RATING, value=5.0, event_time_ms=1_700_000_000_000)]
    publish(broker, name, ahead)
    started = time.time()
    run_ingester(broker, store, directory, name, clock=lambda: time.time() + 3600)
    first = row_stamps(store, 5, 7)
    assert all(stamp >= (started + 3600) * 1e6 for stamp in first), first  # the clock ahead's stamps
    later = [make_event(user_id=5, item_id=7 + i, event_type=RATING, value=5.0,
                        event_time_ms=1_700_000_001_000 + i) for i in range(3)]
    publish(broker, name, later)
    run_ingester(broker, store, directory, name)
    assert online_state(store, [5])[5] == ([7, 7, 8, 9], 4)
    assert item_counts(store, [7, 8]) == [2, 1]
    second = row_stamps(store, 5, 7)
    assert all(now > before for now, before in zip(second, first)), (first, second)  # monotone, not the clock's


def test_features_show_prints_what_the_store_holds_for_one_entity(broker, any_store):
    """`plexrec features show --user/--item`: profile, history or counters, the ingester's state and
    the published embeddings' version, as JSON, from SQLite and from Redis."""
    store, directory, flags = any_store
    name = topic()
    events = [make_event(user_id=5, item_id=7 + i, event_type=RATING, value=5.0,
                         event_time_ms=1_700_000_000_000 + 1000 * i) for i in range(3)]
    publish(broker, name, events)
    run_ingester(broker, store, directory, name)
    store.write_to_online_store("item_embeddings", pd.DataFrame({
        "item_id": [7], "attention_embedding": [[0.5] * 4], "representation_embedding": [[0.25] * 8],
        "model_version": ["20260101T000000-test"], "event_timestamp": [pd.Timestamp.now(tz="UTC")]}))

    def show(*entity):
        done = subprocess.run([sys.executable, "-m", "plexrec.cli", "features", "show", *entity, "--data-dir",
                               str(directory), *flags], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    user, item = show("--user", "5"), show("--item", "7")
    assert user["profile"]["gender"] in ("M", "F") and user["schema"] == "ml-100k"
    history = user["history"]
    assert history["history_item_ids"] == [7, 8, 9] and history["interaction_count"] == 3
    assert history["history_timestamps"] == [1_700_000_000, 1_700_000_001, 1_700_000_002]
    assert history["ingester"]["watermark"]["source"].startswith(f"{name}@")
    assert history["ingester"]["watermark"]["offset"] == 2 and history["ingester"]["event_ids_remembered"] == 3
    assert item["profile"]["item_category"] and item["counters"]["interaction_count"] == 1
    assert max(item["counters"]["ingester"]["watermarks"]["offsets_by_partition"]) == 0
    assert item["embeddings"] == {"model_version": "20260101T000000-test", "attention_embedding_dim": 4,
                                  "representation_embedding_dim": 8,
                                  "written_at": item["embeddings"]["written_at"]}
    from features.show import entity_state

    unknown = entity_state(store, read_store_meta(directory), "user", 999_999)
    assert unknown["history"]["history_item_ids"] is None and unknown["history"]["written_at"] is None


def test_ingester_metrics_count_what_happened(broker, empty_store):
    """The Prometheus endpoint: events, applied, duplicates by rule, dead letters by reason, commits."""
    import urllib.request

    store, directory = empty_store
    name = topic()
    events = [make_event(user_id=6, item_id=20 + i, event_type=RATING, value=3.0,
                         event_time_ms=1_700_000_000_000 + i) for i in range(4)]
    publish(broker, name, events + events[:2])  # two producer retries
    producer = KafkaProducer(bootstrap_servers=broker)
    producer.send(name, key=b"6", value=b"not an event")
    producer.close()
    ingester = Ingester(broker, store, directory, topic=name, group=name)
    port = ingester.metrics.serve("127.0.0.1", 0)
    try:
        ingester.run(stop_after_idle_seconds=3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        ingester.close()
        ingester.metrics.close()

    def value(sample):
        return float(re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M).group(1))

    # a rebalance on a loaded machine re-delivers a batch: counts of messages read may then exceed 7,
    # but every one is either applied once, skipped as a duplicate, or a dead letter
    events, applied = value("plexrec_ingest_events_total"), value("plexrec_ingest_applied_total")
    by_id = value('plexrec_ingest_duplicates_skipped_total{rule="event_id",side="user"}')
    by_offset = value('plexrec_ingest_duplicates_skipped_total{rule="offset",side="user"}')
    dead = sum(float(v) for v in re.findall(r'^plexrec_ingest_dead_letters_total\{reason="[^"]+"\} (\S+)$',
                                            text, re.M))
    assert applied == 4 and by_id >= 2 and dead >= 1 and events >= 7, text
    assert applied + by_id + by_offset + dead == events, text
    assert value('plexrec_ingest_duplicates_skipped_total{rule="any",side="item"}') >= 2, text
    assert value("plexrec_ingest_commit_seconds_count") >= 1, text
    assert re.search(rf'^plexrec_ingest_consumer_lag\{{partition="\d+",topic="{name}"\}} ', text, re.M), text


def test_replay_publishes_movielens_in_time_order(broker):
    name = topic()
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "replay", "--bootstrap-servers", broker,
                           "--topic", name, "--rate", "0", "--after-fraction", "0.9", "--limit", "300"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    consumer = KafkaConsumer(name, bootstrap_servers=broker, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    events = [decode_event(m.key, m.value) for m in consumer]
    consumer.close()
    assert len(events) == 300
    times = sorted(e.event_time_ms for e in events)
    assert times[0] >= 1_000 * 880_000_000 and all(e.HasField("value") for e in events)
    assert len({e.event_id for e in events}) == 300 and all(e.event_id.startswith("ml-100k-") for e in events)


def test_the_ingester_runs_without_torch():
    code = ("from features.ingest import without_torch; without_torch(); "
            "import features.ingest, features.store, features.events, feast, kafka, sys; "
            "import features.schema, features.tables, features.movielens; "
            "from features.events import check_against_schema, make_event, schema_events; "
            "schema = features.movielens.movielens_schema(); "
            "check_against_schema(make_event(1, 2, item_attributes={'genres': 'Drama|War'}, value=4.0), schema); "
            "print(sys.modules.get('torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"


def test_two_ingesters_in_a_group_share_the_partitions(broker, any_store):
    """A 4-partition topic, two ingester processes in one group: every user's state exact, and every
    item's count, although each of the 40 items gets events from every partition."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    store, directory, flags = any_store
    name = topic()
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])
    admin.close()
    events = publish_random_events(broker, name, 6000, users=300, items=40, seed=2)
    command, env = ingest_command(broker, name, directory, idle_seconds=5, flags=flags)
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in processes]
    assert all(p.returncode == 0 for p in processes), logs
    applied = [int(line.split(" applied")[0].split(", ")[-1]) for log in logs for line in log.splitlines()
               if "stopped:" in line]
    assert sum(applied) == 6000 and all(n > 0 for n in applied), applied  # both did part of the work
    truth = expected_state(events)
    assert online_state(store, sorted(truth)) == truth
    assert item_counts_match(store, events)


def test_a_deleted_and_recreated_topic_is_a_new_topic(broker, empty_store):
    """The topic is really deleted and recreated under its name: its offsets restart at 0 below the
    old watermarks, yet its events are new: to the ingester that saw the old one (it notices
    mid-run) and to one started afterwards."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    store, directory = empty_store
    name, seen = topic(), []
    admin = KafkaAdminClient(bootstrap_servers=broker)

    def publish_round(round_):
        events = [make_event(user_id=77, item_id=1 + 10 * round_ + i, event_type=RATING, value=5.0,
                             event_time_ms=1_700_000_000_000 + 1000 * (10 * round_ + i)) for i in range(5)]
        events += [make_event(user_id=78, item_id=11, event_type=RATING, value=4.0,
                              event_time_ms=1_700_000_000_000 + 1000 * round_)]
        publish(broker, name, events)
        seen.extend(events)

    def recreate():
        admin.delete_topics([name])
        time.sleep(0.5)
        admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])

    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    publish_round(0)
    ingester = Ingester(broker, store, directory, topic=name, group=name)
    ingester.run(stop_after_idle_seconds=3)
    recreate()
    publish_round(1)
    ingester.run(stop_after_idle_seconds=3)  # the same ingester, across the recreation
    ingester.close()
    recreate()
    publish_round(2)
    run_ingester(broker, store, directory, name)  # a fresh one
    admin.close()
    assert online_state(store, [77])[77] == ([e.item_id for e in seen if e.user_id == 77], 15)
    assert online_state(store, [78])[78] == ([11] * 3, 3)
    assert item_counts(store, [11]) == [4]  # round 1's item 11 and user 78's three


# --- events judged against the store's schema ---

def run_ingester(broker, store, directory, name, **options):
    ingester = Ingester(broker, store, directory, topic=name, group=name, **options)
    try:
        return ingester.run(stop_after_idle_seconds=3)
    finally:
        ingester.close()


def publish(broker, name, events):
    producer = EventProducer(broker, name)
    producer.send_all(events)
    producer.close()


def history_of(store, user):
    row = store.get_online_features(
        features=["user_history:history_item_ids", "user_history:history_timestamps",
                  "user_history:interaction_count"], entity_rows=[{"user_id": user}]).to_dict()
    return list(row["history_item_ids"][0] or []), list(row["history_timestamps"][0] or []), \
        row["interaction_count"][0] or 0


def item_counts(store, items):
    return store.get_online_features(features=["item_counters:interaction_count"],
                                     entity_rows=[{"item_id": i} for i in items]).to_dict()["interaction_count"]


def test_labels_follow_the_schemas_rule():
    movielens, kuairand = movielens_schema(), DatasetSchema.from_yaml(KUAIRAND_SCHEMA)
    assert check_against_schema(make_event(1, 2, RATING, value=4.0), movielens) == 1
    assert check_against_schema(make_event(1, 2, RATING, value=3.5), movielens) == 0
    assert check_against_schema(make_event(1, 2, IMPRESSION, label=1), movielens) == 1  # a label wins
    with pytest.raises(InvalidEvent, match="value is missing: .* labels events by rating"):
        check_against_schema(make_event(1, 2, CLICK), movielens)  # a rating schema labels by value only
    assert check_against_schema(make_event(0, 0, IMPRESSION), kuairand) == 0
    assert check_against_schema(make_event(0, 0, CLICK), kuairand) == 1
    assert check_against_schema(make_event(0, 0, EventType.EVENT_TYPE_PURCHASE), kuairand) == 1
    assert check_against_schema(make_event(0, 0, CLICK, label=0), kuairand) == 0
    with pytest.raises(InvalidEvent, match="value is missing: .* 0/1 column 'is_click'"):
        check_against_schema(make_event(0, 0, RATING), kuairand)
    # history: all keeps every labelled event, history: positive the clicks
    assert is_behaviour(0, movielens) and is_behaviour(1, movielens)
    assert not is_behaviour(0, kuairand) and is_behaviour(1, kuairand)


def test_context_and_item_attributes_must_fit_the_schema():
    schema = DatasetSchema(user="u", item="i", timestamp="t", path="x.parquet", label="y", name="shop",
                           items={"categorical": ["brand"], "multi_valued": {"colours": None}, "numeric": ["price"]},
                           context={"categorical": ["page"], "numeric": ["position"]})
    fine = make_event(1, 2, CLICK, context={"position": "3", "page": "home", "device": "tv"},
                      item_attributes={"brand": "7", "colours": "red|blue", "price": "9.5"})
    assert check_against_schema(fine, schema) == 1
    assert unknown_context_keys(fine, schema) == ["device"]  # free-form: allowed, logged
    assert stored_item_attributes(fine, schema, {"brand": "Int64", "colours": "Array(String)", "price": "Float32"}) \
        == {"brand": 7, "colours": ["red", "blue"], "price": 9.5}
    for event, reason in [
        (make_event(1, 2, CLICK, context={"position": "top"}), r"context\['position'\] = 'top' is not a number"),
        (make_event(1, 2, CLICK, item_attributes={"price": "cheap"}), r"item_attributes\['price'\] = 'cheap' is not a"),
        (make_event(1, 2, CLICK, item_attributes={"size": "XL"}), r"item_attributes\['size'\] is not a column .*"
                                                                   r"brand, colours, price"),
    ]:
        with pytest.raises(InvalidEvent, match=reason):
            check_against_schema(event, schema)
    with pytest.raises(InvalidEvent, match=r"item_attributes\['brand'\] = 'acme' is not an integer.*Int64"):
        check_against_schema(make_event(1, 2, CLICK, item_attributes={"brand": "acme"}), schema, {"brand": "Int64"})


def test_kuairand_clicks_enter_the_history_and_counts_impressions_do_not(broker, kuairand_store):
    """history: positive. Unclicked impressions change neither the history nor any count; clicks
    (a label 1, or a CLICK without label) do, stamped in milliseconds; user and video 0 are ids."""
    store, directory, tables = kuairand_store
    assert read_store_meta(directory)["schema"]["timestamp_unit"] == "ms"
    user, busy = 0, 5  # user 5: more clicks than the store's history length
    before, busy_before = history_of(store, user), history_of(store, busy)
    counts_before = item_counts(store, [0, 1, 2, 3])
    base = int(tables.interactions.time_ms.max()) + 60_000  # after everything loaded
    events = [make_event(user, 0, IMPRESSION, base + 1, label=0, context={"tab": "1"}),
              make_event(user, 1, IMPRESSION, base + 2, label=1, context={"tab": "1", "device": "tv"}),
              make_event(user, 2, CLICK, base + 3),  # no label: a click is positive
              make_event(user, 3, IMPRESSION, base + 4),  # no label: an impression is not
              make_event(user, 0, IMPRESSION, base + 5, label=1)]
    clicks = [make_event(busy, 100 + i, IMPRESSION, base + 10 + i, label=1) for i in range(25)]
    name = topic()
    publish(broker, name, events + clicks)
    stats = run_ingester(broker, store, directory, name)

    items, stamps, count = history_of(store, user)
    assert (items, stamps, count) == ((before[0] + [1, 2, 0])[-KUAIRAND_HISTORY:],
                                      (before[1] + [base + 2, base + 3, base + 5])[-KUAIRAND_HISTORY:], before[2] + 3)
    # the store's history length (20), not a default of the ingester's
    assert history_of(store, busy) == ([100 + i for i in range(5, 25)], [base + 10 + i for i in range(5, 25)],
                                       busy_before[2] + 25)
    clicked = [1, 1, 1, 0]  # videos 0 (clicked on its second impression), 1, 2; video 3 only impressed
    assert item_counts(store, [0, 1, 2, 3]) == [c if n == 0 else (c or 0) + n for c, n in zip(counts_before, clicked)]
    assert stats.dead_letters == 0 and stats.not_behaviours == 2 and stats.applied == 3 + 25
    logged = read_event_log(directory).set_index("event_id")
    assert [logged.loc[e.event_id, "label"] for e in events] == [0, 1, 1, 0, 1]
    assert json.loads(logged.loc[events[1].event_id, "context"]) == {"tab": "1", "device": "tv"}


def test_events_that_do_not_fit_the_kuairand_schema_are_dead_letters(broker, kuairand_store):
    store, directory, _ = kuairand_store
    user = 299
    bad = {"value is missing: the store's schema 'kuairand-pure' is labelled by the 0/1 column 'is_click'":
           make_event(user, 4, RATING),  # nothing to label it by
           "item_attributes['video_duration'] = 'long' is not a number":
           make_event(user, 4, CLICK, item_attributes={"video_duration": "long"}),
           "item_attributes['title'] is not a column":
           make_event(user, 4, CLICK, item_attributes={"title": "cats"}),
           "item_attributes['author_id'] = 'anna' is not an integer":
           make_event(user, 4, CLICK, item_attributes={"author_id": "anna"}),  # the store keeps Int64
           "label must be 0 or 1": make_event(user, 4, IMPRESSION, label=3)}
    before = history_of(store, user)
    name = topic()
    publish(broker, name, [*bad.values(), make_event(user, 4, CLICK, int(time.time() * 1000))])
    stats = run_ingester(broker, store, directory, name)
    assert stats.dead_letters == len(bad) and stats.applied == 1
    assert history_of(store, user)[2] == before[2] + 1  # only the valid click counted
    consumer = KafkaConsumer(name + ".dead-letter", bootstrap_servers=broker, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    reasons = {UserEvent.FromString(m.value).event_id: dict(m.headers)["reason"].decode() for m in consumer}
    consumer.close()
    assert set(reasons) == {e.event_id for e in bad.values()}
    for reason, event in bad.items():
        assert reasons[event.event_id].startswith(reason), (reason, reasons[event.event_id])


def test_item_attributes_create_and_update_an_items_profile(broker, kuairand_store):
    """A video the store has never seen: its profile comes from the events' attributes (unclicked
    impressions: no count changes), typed as store.json says; the latest event time wins."""
    store, directory, _ = kuairand_store
    item, user, t = 10 ** 7, 298, int(time.time() * 1000) - 600_000
    profile = ["item_profile:author_id", "item_profile:video_type", "item_profile:upload_type",
               "item_profile:music_type", "item_profile:tag", "item_profile:video_duration",
               "item_profile:item_category"]

    def read_profile():
        row = store.get_online_features(features=profile, entity_rows=[{"item_id": item}]).to_dict()
        return {name.split(":")[1]: row[name.split(":")[1]][0] for name in profile}

    assert set(read_profile().values()) == {None}
    history_before = history_of(store, user)
    attributes = {"author_id": "4242", "video_type": "AD", "upload_type": "ShortImport", "music_type": "9",
                  "tag": "17,28", "video_duration": "12500.5"}
    name = topic()
    publish(broker, name, [make_event(user, item, IMPRESSION, t, label=0, item_attributes=attributes),
                           # later, and only one attribute: the others stay
                           make_event(user, item, IMPRESSION, t + 10_000, label=0,
                                      item_attributes={"video_type": "NORMAL", "tag": "5"})])
    stats = run_ingester(broker, store, directory, name)
    assert stats.item_profiles in (1, 2) and stats.dead_letters == 0  # the two deltas in one batch or two
    expected = {"author_id": 4242, "video_type": "NORMAL", "upload_type": "ShortImport", "music_type": 9,
                "tag": "5", "video_duration": 12500.5, "item_category": "5"}
    assert read_profile() == expected
    assert item_counts(store, [item]) == [None]  # impressions: attributes written, nothing counted
    assert history_of(store, user) == history_before

    # an older event arriving later changes nothing; a click without attributes counts, profile kept
    publish(broker, name, [make_event(user, item, IMPRESSION, t - 60_000, label=0,
                                      item_attributes={"video_type": "STALE"}),
                           make_event(user, item, CLICK, t + 20_000)])
    run_ingester(broker, store, directory, name)
    assert read_profile() == expected
    assert item_counts(store, [item]) == [1]


def test_the_history_length_is_the_stores_and_no_other(empty_store):
    """One store, one history length: training, the learner and serving read the store's (store.json),
    so an ingester keeping a shorter one would have serving score 5 behaviours where the model was
    trained on 50 (issue 21). A length that differs is refused, naming the flag and what to do,
    before touching Kafka; repeating the store's is allowed."""
    assert history_length_of({"history_length": 50}, None) == 50
    assert history_length_of({"history_length": 50}, 50) == 50
    for other in (5, 60, 0):
        with pytest.raises(IngestError, match=f"--history-length {other} differs from the store's 50 .*"
                                              f"plexrec features load --history-length {other}"):
            history_length_of({"history_length": 50}, other)
    store, directory = empty_store
    for other in (5, 201):
        with pytest.raises(IngestError, match=f"differs from the store's 200"):
            Ingester("127.0.0.1:1", store, directory, history_length=other)
    with pytest.raises(StoreError, match="load a data set first"):
        Ingester("127.0.0.1:1", store, directory / "nowhere")
    done = subprocess.run([sys.executable, "-m", "features.ingest", "--bootstrap-servers", "127.0.0.1:1",
                           "--data-dir", str(directory), "--history-length", "5"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode != 0
    assert "plexrec ingest: --history-length 5 differs from the store's 200" in done.stderr, done.stderr[-2000:]


def test_schema_events_name_their_rows_in_the_schemas_terms(kuairand_store):
    _, _, tables = kuairand_store
    frame = tables.interactions.head(3)
    events = schema_events(frame, tables.schema)
    row = frame.iloc[0]
    assert events[0].event_id == f"kuairand-pure-{row.user_id}-{row.video_id}-{row.time_ms}"
    assert events[0].event_time_ms == row.time_ms and events[0].event_type == IMPRESSION  # already in ms
    assert [e.label for e in events] == frame.is_click.tolist() and events[0].context == {"tab": str(row.tab)}
    ratings = movielens_tables(movielens_schema()).interactions.head(2)
    rated = schema_events(ratings, movielens_schema())
    assert rated[0].event_time_ms == ratings.timestamp.iloc[0] * 1000 and rated[0].value == ratings.rating.iloc[0]
    assert not rated[0].HasField("label") and rated[0].event_type == RATING


def test_replay_publishes_any_schemas_rows(broker):
    name = topic()
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "replay", "--bootstrap-servers", broker,
                           "--topic", name, "--schema", str(KUAIRAND_SCHEMA), "--rate", "0",
                           "--after-fraction", "0.99", "--limit", "50"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    consumer = KafkaConsumer(name, bootstrap_servers=broker, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    events = [decode_event(m.key, m.value) for m in consumer]
    consumer.close()
    assert len(events) == 50 and all(e.HasField("label") and "tab" in e.context for e in events)
    expected = replay_events(DatasetSchema.from_yaml(KUAIRAND_SCHEMA), after_fraction=0.99, limit=50)
    assert sorted(e.event_id for e in events) == sorted(e.event_id for e in expected)
    assert min(e.event_time_ms for e in events) > 1_600_000_000_000  # milliseconds
    per_user = defaultdict(list)  # one partition per user: each user's events arrive in time order
    for event in events:
        per_user[event.user_id].append(event.event_time_ms)
    assert all(times == sorted(times) for times in per_user.values())
