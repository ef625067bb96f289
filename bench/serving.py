"""The scoring server under closed-loop load: latency, calls/s, and where the time goes.

    .venv/bin/python bench/serving.py [--config configs/ml100k_sequence.yaml] [--model-dir DIR]
                                      [--seconds 8] [--concurrency 1,8,32] [--candidates 100,1000]
    .venv/bin/python bench/serving.py --seconds 1 --concurrency 1 --candidates 100   # a quick check

One `plexrec serve` process (its own process, so the load generator does not share
its interpreter) over the data set of the run config's schema (default ML-100K)
in a local Feast store; the users with the longest histories; each call scores
100 or 1,000 distinct random items of the catalogue (with the schema's context
features, when it declares any, set from a random interaction). For every cell:
p50/p99 end-to-end latency seen by the client and calls/s, and the server's mean
time per stage (feature fetch, model inputs, forward) from its Prometheus metrics.
The model's forward alone (same batches, no server) gives the ratio
end-to-end p50 / forward p50. Without --model-dir, trains the config's model
(default: the DARE ranker of configs/ml100k_sequence.yaml) for one epoch first.
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
from recsys.config import load_config, resolve_path  # noqa: E402
from recsys.data.examples import labels_of  # noqa: E402
from recsys.data.schema import DatasetSchema, value_text  # noqa: E402
from recsys.data.tables import read_tables  # noqa: E402

HISTORY = 200  # what the store keeps per user
USERS = 100  # the users with the most behaviours are the callers
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


async def closed_loop(target: str, users: list[int], catalogue: np.ndarray, contexts: list[dict[str, str]],
                      candidates: int, concurrency: int, seconds: float, seed: int) -> list[float]:
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
                    user_id=int(rng.choice(users)), item_ids=rng.permutation(catalogue)[:candidates].tolist(),
                    context=contexts[int(rng.integers(len(contexts)))])
                started = time.perf_counter()
                await stub.Score(request, timeout=30)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def forward_alone(model_dir: Path, store, users: list[int], catalogue: np.ndarray, contexts: list[dict[str, str]],
                  candidates: int, repeats: int = 20) -> float:
    """p50 seconds of the model's forward on the batches the server builds."""
    from serving.inputs import request_context
    from serving.model import ModelWatcher

    import torch

    torch.set_num_threads(1)  # as `plexrec serve` runs it (--torch-threads 1): the ratio compares like with like
    online = OnlineFeatures(store)
    model = ModelWatcher(model_dir, online.meta).current
    rng = np.random.default_rng(0)
    times = []
    for r in range(repeats):
        user = online.user(users[r % len(users)])
        user.context = request_context(online.schema, contexts[r % len(contexts)])
        items = rng.permutation(catalogue)[:candidates].tolist()
        found = online.items(items)
        history = user.history_item_ids[-model.history_length:] if model.history_length else []
        batch = model.batch([(user, [found[i] for i in items])], online.items(history))
        started = time.perf_counter()
        model.probabilities(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times[2:]))


def train_model(config: str, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--config", config,
                    "--epochs", "1", "--out-dir", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out / "models"


def callers_and_contexts(tables) -> tuple[list[int], list[dict[str, str]]]:
    """The users with the most behaviours (the longest histories), and the context maps of some
    interactions (as a client sends them: text; [{}] when the schema declares no context)."""
    schema = tables.schema
    frame = tables.interactions
    behaviours = frame[labels_of(frame, schema) == 1] if schema.history == "positive" else frame
    users = [int(u) for u in behaviours[schema.user].value_counts().index[:USERS]]
    columns = schema.context.columns
    if not columns:
        return users, [{}]
    sample = frame[columns].sample(min(len(frame), 1000), random_state=0)
    contexts = [{c: text for c in columns if (text := value_text(row[c])) is not None}
                for _, row in sample.iterrows()]
    return users, contexts


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
    parser.add_argument("--config", default="configs/ml100k_sequence.yaml",
                        help="run config: its data.schema is the data set served; without --model-dir its "
                             "model is trained for one epoch")
    parser.add_argument("--model-dir", help="exported model (or models/ root) trained on the config's schema; "
                                            "default: train one epoch first")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load cell")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--candidates", default="100,1000")
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()
    schema = DatasetSchema.from_yaml(resolve_path(load_config(resolve_path(args.config)).data.schema))
    tables = read_tables(schema)
    users, contexts = callers_and_contexts(tables)
    catalogue = np.unique(tables.items[schema.item].to_numpy(dtype=np.int64))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model_dir) if args.model_dir else train_model(args.config, tmp / "run")
        store = open_store("local", tmp / "store")
        load_into_store(store, tables, tmp / "store", history_length=HISTORY)
        port, metrics_port = free_port(), free_port()
        target, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        server = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--model-dir", str(model_dir),
                                   "--data-dir", str(tmp / "store"), "--port", str(port), "--metrics-port",
                                   str(metrics_port)], cwd=ROOT, stderr=(tmp / "server.log").open("w"))
        try:
            wait_until_serving(target, server)
            # warm the item cache and the model
            asyncio.run(closed_loop(target, users, catalogue, contexts, 1000, 2, 3.0, seed=99))
            for candidates in map(int, args.candidates.split(",")):
                forward = forward_alone(model_dir, store, users, catalogue, contexts, candidates)
                for concurrency in map(int, args.concurrency.split(",")):
                    before = stage_sums(metrics_url)
                    latencies = asyncio.run(closed_loop(target, users, catalogue, contexts, candidates, concurrency,
                                                        args.seconds, seed=candidates + concurrency))
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
                          "schema": schema.name, "config": args.config, "history_length": HISTORY, "seconds_per_cell": args.seconds, "results": results})
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
