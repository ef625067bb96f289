"""The scoring server under closed-loop load: latency, calls/s, and where the time goes.

    .venv/bin/python bench/serving.py [--model-dir DIR] [--seconds 8] [--concurrency 1,8,32]

One `plexrec serve` process (its own process, so the load generator does not share
its interpreter) over ML-100K in a local Feast store; users with a full 200-item
history; each call scores 100 or 1,000 distinct random movies. For every cell:
p50/p99 end-to-end latency seen by the client and calls/s, and the server's mean
time per stage (feature fetch, model inputs, forward) from its Prometheus metrics.
The model's forward alone (same batches, no server) gives the ratio
end-to-end p50 / forward p50. Without --model-dir, trains the DARE ranker
(configs/ml100k_sequence.yaml) for one epoch first.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from common import ROOT, machine, now, write_json

from features.broker import free_port  # noqa: E402
from features.load import load_into_store  # noqa: E402
from features.online import OnlineFeatures  # noqa: E402
from features.store import open_store  # noqa: E402
from recsys.data.movielens import load_movielens  # noqa: E402

HISTORY = 200
STAGES = ("feature_fetch", "model_inputs", "forward", "total")


def stage_sums(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage from the server's latency histogram."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    sums: dict[str, list[float]] = {stage: [0.0, 0.0] for stage in STAGES}
    for line in text.splitlines():
        for stage in STAGES:
            if line.startswith(f'plexrec_latency_seconds_sum{{stage="{stage}"}}'):
                sums[stage][0] = float(line.split()[-1])
            elif line.startswith(f'plexrec_latency_seconds_count{{stage="{stage}"}}'):
                sums[stage][1] = float(line.split()[-1])
    return {stage: (s, c) for stage, (s, c) in sums.items()}


async def closed_loop(target: str, users: list[int], candidates: int, concurrency: int, seconds: float,
                      seed: int) -> list[float]:
    import grpc

    from protos.plexrec.v1 import scoring_pb2, scoring_pb2_grpc

    latencies: list[float] = []
    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        deadline = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < deadline:
                request = scoring_pb2.ScoreRequest(
                    user_id=int(rng.choice(users)),
                    item_ids=(rng.permutation(1682)[:candidates] + 1).tolist())
                started = time.perf_counter()
                await stub.Score(request, timeout=30)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def forward_alone(model_dir: Path, store, users: list[int], candidates: int, repeats: int = 20) -> float:
    """p50 seconds of the model's forward on the batches the server builds."""
    from serving.model import ModelWatcher

    model = ModelWatcher(model_dir).current
    online = OnlineFeatures(store)
    rng = np.random.default_rng(0)
    times = []
    for r in range(repeats):
        user = online.user(users[r % len(users)])
        items = (rng.permutation(1682)[:candidates] + 1).tolist()
        found = online.items(items)
        batch = model.batch([(user, [found[i] for i in items])], online.items(user.history_item_ids[-HISTORY:]))
        started = time.perf_counter()
        model.probabilities(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times[2:]))


def train_model(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--config", "configs/ml100k_sequence.yaml",
                    "--epochs", "1", "--out-dir", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out / "models"


def wait_until_serving(target: str, process: subprocess.Popen, timeout: float = 120) -> None:
    from serving.client import ScoringClient

    started = time.monotonic()
    with ScoringClient(target) as client:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise SystemExit(f"plexrec serve exited with {process.returncode}")
            if client.serving():
                return
            time.sleep(0.2)
    raise SystemExit("plexrec serve did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="exported model (or models/ root); default: train one epoch first")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load cell")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--candidates", default="100,1000")
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()
    frame, schema = load_movielens(ROOT / "data" / "ml-100k")
    counts = frame.user_id.value_counts()
    users = sorted(int(u) for u in counts[counts >= HISTORY].index)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model_dir) if args.model_dir else train_model(tmp / "run")
        store = open_store("local", tmp / "store")
        load_into_store(store, frame, schema, tmp / "store", history_length=HISTORY)
        port, metrics_port = free_port(), free_port()
        target, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        server = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--model-dir", str(model_dir),
                                   "--data-dir", str(tmp / "store"), "--port", str(port), "--metrics-port",
                                   str(metrics_port)], cwd=ROOT, stderr=(tmp / "server.log").open("w"))
        try:
            wait_until_serving(target, server)
            asyncio.run(closed_loop(target, users, 1000, 2, 3.0, seed=99))  # warm the item cache and the model
            for candidates in map(int, args.candidates.split(",")):
                forward = forward_alone(model_dir, store, users, candidates)
                for concurrency in map(int, args.concurrency.split(",")):
                    before = stage_sums(metrics_url)
                    latencies = asyncio.run(closed_loop(target, users, candidates, concurrency, args.seconds,
                                                        seed=candidates + concurrency))
                    after = stage_sums(metrics_url)
                    stages = {stage: 1000 * (after[stage][0] - before[stage][0])
                              / max(after[stage][1] - before[stage][1], 1) for stage in STAGES}
                    p50 = float(np.percentile(latencies, 50) * 1000)
                    row = {"candidates": candidates, "concurrency": concurrency, "calls": len(latencies),
                           "calls_per_s": len(latencies) / args.seconds, "p50_ms": p50,
                           "p99_ms": float(np.percentile(latencies, 99) * 1000),
                           "server_mean_ms": stages, "forward_alone_p50_ms": forward * 1000,
                           "p50_over_forward": p50 / (forward * 1000)}
                    results.append(row)
                    print(f"{candidates:5d} candidates x{concurrency:2d}: p50 {p50:7.1f} ms  p99 {row['p99_ms']:7.1f} ms"
                          f"  {row['calls_per_s']:6.1f} calls/s  fetch {stages['feature_fetch']:.1f} / inputs "
                          f"{stages['model_inputs']:.1f} / forward {stages['forward']:.1f} ms  "
                          f"(forward alone {forward * 1000:.1f} ms)", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    write_json(args.out, {"benchmark": "serving", "measured_at": now(), "machine": machine(),
                          "history_length": HISTORY, "seconds_per_cell": args.seconds, "results": results})
    print("\n| candidates | concurrency | p50 | p99 | calls/s | server: fetch / inputs / forward (mean) "
          "| forward alone p50 | p50 / forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["server_mean_ms"]
        print(f"| {r['candidates']:,} | {r['concurrency']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
              f"{r['calls_per_s']:.1f} | {s['feature_fetch']:.1f} / {s['model_inputs']:.1f} / {s['forward']:.1f} ms | "
              f"{r['forward_alone_p50_ms']:.1f} ms | {r['p50_over_forward']:.2f}x |")


if __name__ == "__main__":
    main()
