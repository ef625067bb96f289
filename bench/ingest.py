"""Stream ingestion: sustained events/s into the online store, and freshness.

    .venv/bin/python bench/ingest.py [--events 20000] [--rate 200] [--seconds 15]

For SQLite and Redis, with one and with two `plexrec ingest` processes in a group
(a 4-partition topic on the embedded broker), into a MovieLens-schema store (its
catalogue; the only interaction a placeholder) fed clicks labelled 1:
  throughput  N events produced up front, then the ingesters started: events/s from
              the first batch logged to the last (user histories), and to the last item
              delta committed (item counters too)
  freshness   events produced at a fixed rate while the ingesters run: for every 10th,
              the time from produce to visible in the user's online history (p50 / p99)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, machine, now, write_json

from features.broker import embedded_broker  # noqa: E402
from features.events import EventProducer, make_event  # noqa: E402
from features.load import load_into_store  # noqa: E402
from features.redis_server import local_redis_server  # noqa: E402
from features.store import open_store  # noqa: E402
from protos.plexrec.v1.events_pb2 import EventType  # noqa: E402
from features.movielens import movielens_schema, movielens_tables  # noqa: E402

PARTITIONS = 4
PLACEHOLDER_ID = 10 ** 9  # a store loads at least one interaction: a user and an item the bench never sends


def load_catalogue_store(profile: str, directory: Path, redis_url: str | None):
    """A store the ingester accepts (store.json: the schema decides what events mean) whose users
    start without history, so the freshness probe sees only what it sent."""
    placeholder = pd.DataFrame({"user_id": [PLACEHOLDER_ID], "item_id": [PLACEHOLDER_ID], "rating": [5],
                                "timestamp": [1]})
    store = open_store(profile, directory, redis_url)
    load_into_store(store, movielens_tables(movielens_schema()).with_interactions(placeholder), directory, 200)
    return store


def click(user: int, item: int):
    # a rating schema labels events by their value unless they carry a label: a click carries 1
    return make_event(user, item, EventType.EVENT_TYPE_CLICK, label=1)


def create_topic(bootstrap: str) -> str:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    name = f"bench-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()
    return name


def item_deltas_committed(bootstrap: str, topic: str) -> int:
    """Item deltas the group has committed (offsets start at 0, one per message)."""
    from kafka import KafkaAdminClient

    from features.ingest import ITEM_DELTAS_SUFFIX

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(topic).get(topic, {})
    finally:
        admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic + ITEM_DELTAS_SUFFIX and meta.offset > 0)


def log_files(directory: Path) -> list[tuple[float, int]]:
    """(modification time, events) of every batch in the offline event log, oldest first."""
    return sorted((f.stat().st_mtime, len(pd.read_parquet(f)))
                  for f in (directory / "offline" / "events").glob("*.parquet"))


def start_ingesters(count: int, bootstrap: str, topic: str, directory: Path, profile: str,
                    redis_url: str | None) -> list[subprocess.Popen]:
    command = [sys.executable, "-m", "plexrec.cli", "ingest", "--bootstrap-servers", bootstrap, "--topic", topic,
               "--group", topic, "--data-dir", str(directory), "--profile", profile]
    if redis_url:
        command += ["--redis-url", redis_url]
    return [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=(directory / f"ingester-{i}.log").open("w")) for i in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=30)


def measure(bootstrap: str, profile: str, redis_url: str | None, ingesters: int, events: int, rate: float,
            seconds: float, rng: np.random.Generator) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        store = load_catalogue_store(profile, directory, redis_url)

        topic = create_topic(bootstrap)
        producer = EventProducer(bootstrap, topic)
        producer.send_all(click(int(u), int(i)) for u, i in zip(rng.integers(1, 5000, events),
                                                                rng.integers(1, 50_000, events)))
        processes = start_ingesters(ingesters, bootstrap, topic, directory, profile, redis_url)
        while sum(n for _, n in log_files(directory)) < events:
            time.sleep(0.05)
        # from the end of the first batch to the end of the last: joins and start-up excluded
        batches = log_files(directory)
        throughput = sum(n for _, n in batches[1:]) / max(batches[-1][0] - batches[0][0], 1e-3)
        # item counters lag behind: every event is re-keyed onto the item-delta topic first
        while item_deltas_committed(bootstrap, topic) < events:
            time.sleep(0.05)
        with_items = sum(n for _, n in batches[1:]) / max(time.time() - batches[0][0], 1e-3)

        # freshness: a steady stream while the ingesters are warm
        latencies: list[float] = []
        sampled: list[tuple[int, int, float]] = []
        lock = threading.Lock()

        def check() -> None:
            while True:
                with lock:
                    pending = list(sampled)
                if finished.is_set() and (not pending or time.monotonic() > finished_at[0] + 10):
                    return  # whatever is still pending after 10 s is lost, and shows as missing samples
                for user, item, sent_at in pending:
                    table = store.get_online_features(features=["user_history:history_item_ids"],
                                                      entity_rows=[{"user_id": user}]).to_dict()
                    if item in (table["history_item_ids"][0] or []):
                        latencies.append((time.monotonic() - sent_at) * 1000)
                        with lock:
                            sampled.remove((user, item, sent_at))
                time.sleep(0.002)

        finished, finished_at = threading.Event(), [0.0]
        checker = threading.Thread(target=check)
        checker.start()
        started, count = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            user, item = int(rng.integers(5000, 10_000)), 1_000_000 + count  # unique items: easy to spot
            producer.send(click(user, item))
            if count % 10 == 0:
                producer.producer.flush()
                with lock:
                    sampled.append((user, item, time.monotonic()))
            count += 1
            time.sleep(max(0.0, started + count / rate - time.monotonic()))
        producer.close()
        finished_at[0] = time.monotonic()
        finished.set()
        checker.join(timeout=60)
        died = [i for i, p in enumerate(processes) if p.poll() is not None]
        for i in died:  # an ingester that died mid-run explains missing samples: show why
            print(f"ingester {i} exited with {processes[i].returncode}:\n"
                  + (directory / f"ingester-{i}.log").read_text()[-3000:], flush=True)
        stop(processes)
        return {"profile": profile, "ingesters": ingesters, "events": events, "events_per_s": throughput,
                "events_per_s_with_item_counters": with_items,
                "batches": len(batches), "freshness_rate_per_s": rate, "freshness_samples": len(latencies),
                "freshness_sent_samples": (count + 9) // 10,
                "freshness_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
                "freshness_p99_ms": float(np.percentile(latencies, 99)) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0, help="events/s during the freshness run")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the freshness run")
    parser.add_argument("--out", default="bench/results/ingest.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    with embedded_broker() as bootstrap, local_redis_server() as redis_url:
        for profile, url in (("local", None), ("redis", redis_url)):
            for ingesters in (1, 2):
                result = measure(bootstrap, profile, url, ingesters, args.events, args.rate, args.seconds, rng)
                results.append(result)
                print(f"{profile:6s} x{ingesters}: {result['events_per_s']:8.0f} events/s "
                      f"({result['events_per_s_with_item_counters']:.0f} with item counters), freshness p50 "
                      f"{result['freshness_p50_ms']:.0f} ms p99 {result['freshness_p99_ms']:.0f} ms", flush=True)
    write_json(args.out, {"benchmark": "ingest", "measured_at": now(), "machine": machine(), "results": results})
    print("\n| online store | ingesters | events/s (users) | events/s (users + items) | freshness p50 | "
          "freshness p99 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'SQLite' if r['profile'] == 'local' else 'Redis'} | {r['ingesters']} | {r['events_per_s']:,.0f} | "
              f"{r['events_per_s_with_item_counters']:,.0f} | "
              f"{r['freshness_p50_ms']:.0f} ms | {r['freshness_p99_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
