"""The scoring server under closed-loop load: latency, calls/s, and where the time goes.

    .venv/bin/python bench/serving.py [--config configs/ml100k_sequence.yaml] [--model-dir DIR]
                                      [--seconds 8] [--concurrency 1,8,32] [--candidates 100,1000]
    .venv/bin/python bench/serving.py --seconds 1 --concurrency 1 --candidates 100   # a quick check

One `plexrec serve` process (its own process, so the load generator does not share
its interpreter) over the data set of the run config's schema (default ML-100K)
in a local Feast store; the users with the longest histories; each call scores
100 or 1,000 distinct random items of the catalogue (with the schema's context
features, when it declares any, set from a random interaction). For every cell:
p50/p99 end-to-end latency seen by the client, calls/s and calls refused
(RESOURCE_EXHAUSTED: the server's queue bound; the client retries after 1 ms), and
the server's mean time per stage (feature fetch, model inputs, forward) from its
Prometheus metrics. Side by side in the same run: a bare grpc.aio round trip (the
server's health check), the model alone in process on the same requests (the fast
path's inputs + forward; today's eager path: training's pandas rows and the TorchRec
Ranker, as serving ran before recsys/inference.py), and the ratios. The engines
(TorchScript, torch.compile, ONNX Runtime, ...) are compared by bench/inference_engines.py.
Ends with issue 14's goals, met or not. Without --model-dir, trains the config's model
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
from features.examples import labels_of  # noqa: E402
from features.schema import DatasetSchema, value_text  # noqa: E402
from features.datasets import read_tables  # noqa: E402

HISTORY = 200  # what the store keeps per user
USERS = 100  # the users with the most behaviours are the callers
STAGES = ("feature_fetch", "model_inputs", "forward", "total")
GOALS = [  # issue 14's, for the DARE model of configs/ml100k_sequence.yaml on this 2-core machine
    {"candidates": 100, "concurrency": 1, "metric": "p50_ms", "at_most": 2},
    {"candidates": 100, "concurrency": 1, "metric": "p99_ms", "at_most": 5},
    {"candidates": 100, "concurrency": 8, "metric": "p99_ms", "at_most": 10},
    {"candidates": 100, "concurrency": 32, "metric": "calls_per_s", "at_least": 1000},
    {"candidates": 1000, "concurrency": 1, "metric": "p99_ms", "at_most": 25},
]


def stage_sums(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage from the server's latency histogram."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    sums: dict[str, list[float]] = {stage: [0.0, 0.0] for stage in (*STAGES, "batch_calls")}
    for line in text.splitlines():
        if line.startswith("plexrec_batch_calls_sum"):
            sums["batch_calls"][0] = float(line.split()[-1])
        elif line.startswith("plexrec_batch_calls_count"):
            sums["batch_calls"][1] = float(line.split()[-1])
        for stage in STAGES:
            if line.startswith(f'plexrec_latency_seconds_sum{{stage="{stage}"}}'):
                sums[stage][0] = float(line.split()[-1])
            elif line.startswith(f'plexrec_latency_seconds_count{{stage="{stage}"}}'):
                sums[stage][1] = float(line.split()[-1])
    return {stage: (s, c) for stage, (s, c) in sums.items()}


async def closed_loop(target: str, users: list[int], catalogue: np.ndarray, contexts: list[dict[str, str]],
                      candidates: int, concurrency: int, seconds: float, seed: int) -> tuple[list[float], int]:
    """(latencies of the answered calls, how many calls were refused RESOURCE_EXHAUSTED). A refused call
    is retried after 1 ms, as a client backing off would; its latency is not counted."""
    import grpc

    from protos.plexrec.v1 import scoring_pb2, scoring_pb2_grpc

    latencies: list[float] = []
    refused = 0
    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        deadline = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal refused
            while time.monotonic() < deadline:
                request = scoring_pb2.ScoreRequest(
                    user_id=int(rng.choice(users)), item_ids=rng.permutation(catalogue)[:candidates].tolist(),
                    context=contexts[int(rng.integers(len(contexts)))])
                started = time.perf_counter()
                try:
                    await stub.Score(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refused += 1
                    await asyncio.sleep(0.001)
                    continue
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, refused


async def bare_round_trips(target: str, seconds: float, concurrency: int = 1) -> list[float]:
    """Latencies of the server's health check: a grpc.aio round trip through the same server that does
    no work (at concurrency 32: the most calls/s this server and client can exchange at all)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def in_process(model_dir: Path, store, users: list[int], catalogue: np.ndarray, contexts: list[dict[str, str]],
               candidates: int, repeats: int = 40) -> dict[str, float]:
    """p50 ms of the model alone on the requests the server sees (features read beforehand, item vectors
    warm): the fast path's inputs and forward, and today's eager path (training's pandas rows and the
    TorchRec Ranker, as serving ran until this change), with one thread as `plexrec serve` runs it."""
    from serving.inputs import request_context
    from serving.model import ModelWatcher

    import torch

    torch.set_num_threads(1)
    online = OnlineFeatures(store)
    model = ModelWatcher(model_dir, online.meta).current
    rng = np.random.default_rng(0)
    calls = []
    for r in range(repeats):
        user = online.user(users[r % len(users)])
        user.context = request_context(online.schema, contexts[r % len(contexts)])
        items = rng.permutation(catalogue)[:candidates].tolist()
        found = online.items(items)
        history = user.history_item_ids[-model.history_length:] if model.history_length else []
        calls.append(([(user, [found[i] for i in items])], online.items(history)))
    for requests, history in calls:  # warm the item vectors: the server has seen these items
        model.batch(requests, history)
    times = {"inputs": [], "forward": [], "eager": []}
    for requests, history in calls:
        started = time.perf_counter()
        inputs = model.batch(requests, history)
        built = time.perf_counter()
        model.probabilities(inputs)
        done = time.perf_counter()
        model.eager_probabilities(model.eager_batch(requests, history))
        times["inputs"].append(built - started)
        times["forward"].append(done - built)
        times["eager"].append(time.perf_counter() - done)
    return {name: float(np.median(values[2:]) * 1000) for name, values in times.items()}


def train_model(config: str, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "plexrec.cli", "train", "--config", config,
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
        server = subprocess.Popen([sys.executable, "-m", "plexrec.cli", "serve", "--model-dir", str(model_dir),
                                   "--data-dir", str(tmp / "store"), "--port", str(port), "--metrics-port",
                                   str(metrics_port)], cwd=ROOT, stderr=(tmp / "server.log").open("w"))
        try:
            wait_until_serving(target, server)
            # warm the item cache and the model
            asyncio.run(closed_loop(target, users, catalogue, contexts, 1000, 2, 3.0, seed=99))
            bare = asyncio.run(bare_round_trips(target, min(args.seconds, 3.0)))
            bare_p50 = float(np.percentile(bare, 50) * 1000)
            bare_seconds = min(args.seconds, 3.0)
            bare_ceiling = len(asyncio.run(bare_round_trips(target, bare_seconds, 32))) / bare_seconds
            print(f"bare grpc.aio round trip (health check, same server): p50 {bare_p50:.2f} ms; "
                  f"{bare_ceiling:,.0f} calls/s at concurrency 32", flush=True)
            for candidates in map(int, args.candidates.split(",")):
                alone = in_process(model_dir, store, users, catalogue, contexts, candidates)
                print(f"{candidates:5d} candidates in process: inputs {alone['inputs']:.2f} + forward "
                      f"{alone['forward']:.2f} ms; today's eager path {alone['eager']:.2f} ms", flush=True)
                for concurrency in map(int, args.concurrency.split(",")):
                    before = stage_sums(metrics_url)
                    latencies, refused = asyncio.run(closed_loop(target, users, catalogue, contexts, candidates,
                                                                 concurrency, args.seconds,
                                                                 seed=candidates + concurrency))
                    after = stage_sums(metrics_url)
                    stages = {stage: 1000 * (after[stage][0] - before[stage][0])
                              / max(after[stage][1] - before[stage][1], 1) for stage in STAGES}
                    # each call observes the size of the batch it was scored in: a call-weighted mean
                    calls_per_batch = ((after["batch_calls"][0] - before["batch_calls"][0])
                                       / max(after["batch_calls"][1] - before["batch_calls"][1], 1))
                    p50 = float(np.percentile(latencies, 50) * 1000)
                    fast = alone["inputs"] + alone["forward"]
                    row = {"candidates": candidates, "concurrency": concurrency, "calls": len(latencies),
                           "refused": refused, "calls_per_s": len(latencies) / args.seconds, "p50_ms": p50,
                           "p99_ms": float(np.percentile(latencies, 99) * 1000),
                           "server_mean_ms": stages, "calls_per_batch": calls_per_batch,
                           "bare_round_trip_p50_ms": bare_p50,
                           "model_alone_p50_ms": alone, "eager_over_fast": alone["eager"] / fast,
                           "p50_over_bare_round_trip": p50 / bare_p50, "p50_over_model_alone": p50 / fast}
                    results.append(row)
                    print(f"{candidates:5d} candidates x{concurrency:2d}: p50 {p50:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
                          f"  {row['calls_per_s']:7.1f} calls/s ({refused} refused)  server: fetch "
                          f"{stages['feature_fetch']:.2f} / inputs {stages['model_inputs']:.2f} / forward "
                          f"{stages['forward']:.2f} ms per batch of {calls_per_batch:.1f} calls", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    write_json(args.out, {"benchmark": "serving", "measured_at": now(), "machine": machine(),
                          "schema": schema.name, "config": args.config, "history_length": HISTORY,
                          "seconds_per_cell": args.seconds, "goals": GOALS,
                          "bare_round_trip_calls_per_s_at_32": bare_ceiling, "results": results})
    print("\n| candidates | concurrency | p50 | p99 | calls/s | server: fetch / inputs / forward (mean) "
          "| p50 / bare gRPC | model alone: fast (inputs + forward) | eager path | eager / fast |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, alone = r["server_mean_ms"], r["model_alone_p50_ms"]
        print(f"| {r['candidates']:,} | {r['concurrency']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
              f"{r['calls_per_s']:,.0f} | {s['feature_fetch']:.2f} / {s['model_inputs']:.2f} / {s['forward']:.2f} ms | "
              f"{r['p50_over_bare_round_trip']:.1f}x | {alone['inputs'] + alone['forward']:.2f} ms | "
              f"{alone['eager']:.1f} ms | {r['eager_over_fast']:.1f}x |")
    print("\ngoals (issue 14, this machine):")
    for goal in GOALS:
        row = next((r for r in results if r["candidates"] == goal["candidates"]
                    and r["concurrency"] == goal["concurrency"]), None)
        if row is not None:
            value = row[goal["metric"]]
            met = value <= goal["at_most"] if "at_most" in goal else value >= goal["at_least"]
            bound = f"<= {goal['at_most']}" if "at_most" in goal else f">= {goal['at_least']}"
            print(f"  {goal['candidates']:,} x c{goal['concurrency']} {goal['metric']} {value:.1f} (goal {bound}): "
                  f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
