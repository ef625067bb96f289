"""The stream ingester against the real embedded broker and a real local Feast store."""

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

from features.events import EventProducer, decode_event, InvalidEvent, make_event
from features.ingest import Ingester, read_event_log
from features.store import apply_definitions, open_store
from protos.plexrec.v1.events_pb2 import EventType

RATING = EventType.EVENT_TYPE_RATING


@pytest.fixture
def empty_store(tmp_path):
    store = open_store("local", tmp_path)
    apply_definitions(store, tmp_path)
    return store, tmp_path


def topic() -> str:
    return f"events-{uuid.uuid4().hex[:8]}"


def publish_random_events(broker, name, count, users, items, seed):
    """``count`` rating events of random users and items at random times, published to ``name``."""
    rng = np.random.default_rng(seed)
    events = [make_event(user_id=int(rng.integers(1, users)), item_id=int(rng.integers(1, items)), event_type=RATING,
                         event_time_ms=1_700_000_000_000 + int(rng.integers(0, 10 ** 8))) for _ in range(count)]
    producer = EventProducer(broker, name)
    producer.send_all(events)
    producer.close()
    return events


def ingest_command(broker, name, directory, idle_seconds):
    command = [sys.executable, "-m", "features.ingest", "--bootstrap-servers", broker, "--topic", name,
               "--group", name, "--data-dir", str(directory), "--stop-after-idle", str(idle_seconds)]
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
    store, directory = empty_store
    name = topic()
    base = 1_700_000_000_000
    events = [make_event(user_id=1 + i % 3, item_id=100 + i, event_type=RATING, event_time_ms=base + 1000 * (i % 7))
              for i in range(60)]
    events.append(make_event(user_id=1, item_id=5, event_type=EventType.EVENT_TYPE_IMPRESSION,
                             event_time_ms=base))  # impressions are not behaviours
    producer = EventProducer(broker, name)
    producer.send_all(events)
    producer.close()
    ingester = Ingester(broker, store, directory, topic=name, group=name)
    with caplog.at_level("INFO", logger="plexrec.ingest"):
        stats = ingester.run(stop_after_idle_seconds=3, progress_seconds=0.5)
    ingester.close()
    assert re.search(r"last \d+ s: \d+ events \(\d+/s\), \d+ applied", caplog.text)  # progress was logged
    behaviours = [e for e in events if e.event_type == RATING]
    assert online_state(store, [1, 2, 3]) == expected_state(behaviours)
    assert stats.events == 61 and stats.applied == 60 and stats.item_deltas == 60 and stats.dead_letters == 0
    counts = store.get_online_features(features=["item_counters:interaction_count"],
                                       entity_rows=[{"item_id": 100}, {"item_id": 5}]).to_dict()
    assert counts["interaction_count"] == [1, None]
    assert len(read_event_log(directory)) == 61


def test_validation_names_what_is_wrong():
    good = make_event(user_id=7, item_id=3)
    assert decode_event(b"7", good.SerializeToString()).item_id == 3
    for key, value, reason in [
        (b"7", b"\xff\xff\xff", "not a plexrec.v1.UserEvent"),
        (b"7", make_event(user_id=7, item_id=-3).SerializeToString(), "item_id must be a positive id"),
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
            key, value = b"9", make_event(user_id=9, item_id=0).SerializeToString()  # missing item id
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
    good = [make_event(user_id=9, item_id=1000 + i, event_type=RATING) for i in range(5)]
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


def test_sigkill_mid_stream_loses_and_duplicates_nothing(broker, empty_store):
    """20,000 events; the ingester process is killed with SIGKILL three times and restarted."""
    store, directory = empty_store
    name = topic()
    events = publish_random_events(broker, name, 20_000, users=400, items=5000, seed=1)
    command, env = ingest_command(broker, name, directory, idle_seconds=4)
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


def test_replay_publishes_movielens_in_time_order(broker):
    name = topic()
    done = subprocess.run([sys.executable, "-m", "recsys.cli", "replay", "--bootstrap-servers", broker,
                           "--topic", name, "--rate", "0", "--after-fraction", "0.9", "--limit", "300"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    consumer = KafkaConsumer(name, bootstrap_servers=broker, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    events = [decode_event(m.key, m.value) for m in consumer]
    consumer.close()
    assert len(events) == 300
    times = sorted(e.event_time_ms for e in events)
    assert times[0] >= 1_000 * 880_000_000 and all(e.HasField("value") for e in events)
    assert len({e.event_id for e in events}) == 300


def test_the_ingester_runs_without_torch():
    code = ("from features.ingest import without_torch; without_torch(); "
            "import features.ingest, features.store, features.events, feast, kafka, sys; "
            "print(sys.modules.get('torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"


def test_two_ingesters_in_a_group_share_the_partitions(broker, empty_store):
    """A 4-partition topic, two ingester processes in one group: every user's state exact, and every
    item's count, although each of the 40 items gets events from every partition."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    store, directory = empty_store
    name = topic()
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])
    admin.close()
    events = publish_random_events(broker, name, 6000, users=300, items=40, seed=2)
    command, env = ingest_command(broker, name, directory, idle_seconds=5)
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


def test_a_recreated_topic_is_not_mistaken_for_re_delivery(broker, empty_store):
    """Offsets restart at 0 on a new topic: its events are new, whatever the old watermarks say."""
    store, directory = empty_store
    seen = []
    for round_ in range(2):
        name = topic()
        events = [make_event(user_id=77, item_id=1 + 10 * round_ + i, event_type=RATING,
                             event_time_ms=1_700_000_000_000 + 1000 * (10 * round_ + i)) for i in range(5)]
        seen += events
        producer = EventProducer(broker, name)
        producer.send_all(events)
        producer.close()
        ingester = Ingester(broker, store, directory, topic=name, group=name)
        ingester.run(stop_after_idle_seconds=3)
        ingester.close()
    assert online_state(store, [77])[77] == ([e.item_id for e in seen], 10)
    counts = store.get_online_features(features=["item_counters:interaction_count"],
                                       entity_rows=[{"item_id": 11}]).to_dict()["interaction_count"]
    assert counts == [1]
