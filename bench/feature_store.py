"""The feature store's costs: online reads, publishing embeddings, point-in-time joins.

    .venv/bin/python bench/feature_store.py [--reads 300]

For SQLite (local profile) and Redis (a throw-away redis-server on loopback), each
loaded with ML-100K: read latency p50/p99 of one user, and of one user + 100 items
with the item cache cold (every read goes to the store) and warm; the time to
publish 10k and 100k 64-d item embeddings; and the point-in-time examples of the 100k
ratings (features/example_tables.py on DuckDB, the same for both profiles).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, now, write_json

from features.load import load_into_store  # noqa: E402
from features.online import OnlineFeatures  # noqa: E402
from features.publish import publish_item_embeddings  # noqa: E402
from features.redis_server import local_redis_server  # noqa: E402
from features.store import open_store  # noqa: E402
from features.training import examples_from_store  # noqa: E402
from recsys.logs import configure_logging  # noqa: E402
from features.movielens import movielens_schema, movielens_tables  # noqa: E402


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(samples_ms, 50)), "p99_ms": float(np.percentile(samples_ms, 99))}


def timed(call, repeats: int) -> list[float]:
    samples = []
    for i in range(repeats):
        started = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure_profile(profile: str, directory: Path, redis_url: str | None, tables, reads: int) -> dict:
    store = open_store(profile, directory, redis_url)
    load_into_store(store, tables, directory, history_length=200)
    rng = np.random.default_rng(0)
    users = rng.integers(1, 944, reads)
    items = [rng.choice(np.arange(1, 1683), 100, replace=False).tolist() for _ in range(reads)]
    online = OnlineFeatures(store, ttl_seconds=3600)
    online.user(1), online.items(items[0])  # connections, registry cache
    result = {"one_user": percentiles(timed(lambda i: online.user(int(users[i])), reads))}

    cold = OnlineFeatures(store, ttl_seconds=0)  # every item read misses the cache
    result["user_and_100_items_uncached"] = percentiles(
        timed(lambda i: (cold.user(int(users[i])), cold.items(items[i])), reads))
    for i in range(reads):  # warm every item
        online.items(items[i])
    result["user_and_100_items_cached"] = percentiles(
        timed(lambda i: (online.user(int(users[i])), online.items(items[i])), reads))

    for count in (10_000, 100_000):
        ids = np.arange(1, count + 1)
        vectors = rng.standard_normal((count, 64)).astype(np.float32)
        started = time.perf_counter()
        publish_item_embeddings(store, ids, vectors, vectors[:, :16], f"bench-{count}", directory)
        result[f"publish_{count}_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--out", default="bench/results/feature_store.json")
    args = parser.parse_args()
    configure_logging()
    tables = movielens_tables(movielens_schema())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure_profile("local", Path(tmp) / "sqlite", None, tables, args.reads)
        with local_redis_server() as url:
            results["redis"] = measure_profile("redis", Path(tmp) / "redis", url, tables, args.reads)
        store = open_store("local", Path(tmp) / "sqlite")
        started = time.perf_counter()
        rows = len(examples_from_store(store, Path(tmp) / "sqlite"))
        results["point_in_time_join"] = {"rows": rows, "seconds": time.perf_counter() - started}

    write_json(args.out, {"benchmark": "feature_store", "measured_at": now(), "machine": machine(),
                          "reads": args.reads, "results": results})
    print("\n| measure | SQLite | Redis |")
    print("|---|---|---|")
    for key, label in [("one_user", "1 user"), ("user_and_100_items_uncached", "1 user + 100 items, cache cold"),
                       ("user_and_100_items_cached", "1 user + 100 items, cache warm")]:
        s, r = results["sqlite"][key], results["redis"][key]
        print(f"| {label}: p50 / p99 | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} ms | "
              f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms |")
    for count in (10_000, 100_000):
        key = f"publish_{count}_seconds"
        print(f"| publish {count:,} 64-d embeddings | {results['sqlite'][key]:.1f} s | {results['redis'][key]:.1f} s |")
    join = results["point_in_time_join"]
    print(f"| point-in-time examples, {join['rows']:,} rows | {join['seconds']:.1f} s (DuckDB) | same |")


if __name__ == "__main__":
    main()
