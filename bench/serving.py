"""The scoring server under load: latency, calls/s, where the time goes, overload, more processes.

    .venv/bin/python bench/serving.py [--config configs/ml100k_sequence.yaml] [--model-dir DIR]
        [--seconds 8] [--concurrency 1,8,32] [--candidates 100,1000] [--processes 1,2] [--overload 4]
    .venv/bin/python bench/serving.py --seconds 1 --concurrency 1 --candidates 100 --processes 1   # a quick check

`plexrec serve` (its own process, so the load generator does not share its interpreter; for
each of ``--processes`` with that many workers) over the data set of the run config's schema
(default ML-100K) in a local Feast store; the users with the longest histories; each call scores
100 or 1,000 distinct random items of the catalogue (with the schema's context features, when it
declares any, set from a random interaction). In one run, side by side:

- closed-loop cells (a Python grpc.aio client, callers spread over up to 4 connections per
  worker): p50/p99 end-to-end latency, calls/s, calls refused (RESOURCE_EXHAUSTED; the client
  retries after 1 ms), the server's mean time per stage (feature fetch, model inputs, forward)
  summed over its workers' Prometheus metrics, each stage over its in-process time;
- the bare grpc.aio round trip (the server's health check) and every latency over it;
- the model alone in process on the same requests (the fast path's inputs + forward, and the
  eager path: training's pandas rows and the TorchRec Ranker);
- overload (1 process): h2load offers ``--overload`` times the OK calls/s it got from 1 process
  (16 connections x 4 streams) while a Python probe sends 20 calls/s (deadline 1 s): the probe's
  admitted calls' p50/p99 against the unloaded (concurrency 1) p99, on a server with the time
  target ``--max-queue-ms`` (50), on one with a target of the unloaded p50 of the call's size,
  and on one without (the deadline and the row bound alone).
  The other cells run without a time target: they measure capacity, not shedding (a client that
  retries a refused call at once turns shedding into a refusal storm that starves the scoring);
- with h2load (Debian's nghttp2-client; `scripts/install.sh` installs it), a C load generator
  that costs far less CPU per call than the server: calls/s of the bare health check and of
  Score, per process count (16 connections x 8 streams for the health check; x 4 for Score, x 1
  for 1,000 candidates, whose 64 calls in flight would pass the queue's 16,384-row bound), and
  Score's p50/p99 at each ``--concurrency`` c as c h2load connections with one call in flight
  each, each its own user and candidates (the Python client shares the 2 cores with the server).

Ends with issue 24's goals, met or not. Without --model-dir, trains the config's model
(default: the DARE ranker of configs/ml100k_sequence.yaml) for one epoch first.
"""

from __future__ import annotations

import argparse
import asyncio
import re
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
from serving.config import ServeConfig  # noqa: E402

HISTORY = 200  # what the store keeps per user
USERS = 100  # the users with the most behaviours are the callers
STAGES = ("feature_fetch", "model_inputs", "forward", "total")
GOALS = [  # issue 24's, for the DARE model of configs/ml100k_sequence.yaml on this 2-core machine
    {"candidates": 100, "concurrency": 1, "metric": "p50_ms", "at_most": 2.5},
    {"candidates": 100, "concurrency": 1, "metric": "p99_ms", "at_most": 5},
    {"candidates": 100, "concurrency": 8, "metric": "p99_ms", "at_most": 15},
    {"candidates": 1000, "concurrency": 1, "metric": "p99_ms", "at_most": 25},
    {"processes": 2, "metric": "h2load_calls_per_s", "at_least": 1000},
    {"candidates": 100, "metric": "p99_over_unloaded_p99", "at_most": 2},
    {"candidates": 1000, "metric": "p99_over_unloaded_p99", "at_most": 2},
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


def channels(target: str, count: int) -> list:
    """``count`` grpc.aio channels of their own TCP connection each (a local subchannel pool: else
    channels of one target share one connection, and --processes spreads connections)."""
    import grpc

    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]


def score_request(rng, users, catalogue, contexts, candidates: int):
    from protos.plexrec.v1 import scoring_pb2

    return scoring_pb2.ScoreRequest(user_id=int(rng.choice(users)),
                                    item_ids=rng.permutation(catalogue)[:candidates].tolist(),
                                    context=contexts[int(rng.integers(len(contexts)))])


async def closed_loop(target: str, users: list[int], catalogue: np.ndarray, contexts: list[dict[str, str]],
                      candidates: int, concurrency: int, seconds: float, seed: int,
                      connections: int = 1) -> tuple[list[float], int]:
    """(latencies of the answered calls, how many calls were refused RESOURCE_EXHAUSTED). A refused call
    is retried after 1 ms, as a client backing off would; its latency is not counted. The callers
    take turns over ``connections`` connections."""
    import grpc

    from protos.plexrec.v1 import scoring_pb2_grpc

    latencies: list[float] = []
    refused = 0
    rng = np.random.default_rng(seed)
    opened = channels(target, connections)
    try:
        stubs = [scoring_pb2_grpc.ScoringStub(channel) for channel in opened]
        deadline = time.monotonic() + seconds

        async def caller(stub) -> None:
            nonlocal refused
            while time.monotonic() < deadline:
                request = score_request(rng, users, catalogue, contexts, candidates)
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

        await asyncio.gather(*(caller(stubs[n % len(stubs)]) for n in range(concurrency)))
    finally:
        for channel in opened:
            await channel.close()
    return latencies, refused


async def open_loop(target: str, users: list[int], catalogue: np.ndarray, contexts: list[dict[str, str]],
                    candidates: int, rate: float, seconds: float, seed: int, deadline_s: float = 1.0,
                    connections: int = 4) -> dict:
    """Calls sent at ``rate`` per second whether or not the earlier ones are answered (an overload
    stays an overload: a closed loop slows down with the server), each with a deadline; the
    latencies of the admitted ones and how many were refused or missed their deadline."""
    import grpc

    from protos.plexrec.v1 import scoring_pb2_grpc

    rng = np.random.default_rng(seed)
    requests = [score_request(rng, users, catalogue, contexts, candidates) for _ in range(256)]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    opened = channels(target, connections)
    stubs = [scoring_pb2_grpc.ScoringStub(channel) for channel in opened]

    async def one(n: int) -> None:
        started = time.perf_counter()
        try:
            await stubs[n % len(stubs)].Score(requests[n % len(requests)], timeout=deadline_s)
            latencies.append(time.perf_counter() - started)
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1

    tasks = []
    began = time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = began + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n)))
    sent_seconds = time.perf_counter() - began
    await asyncio.gather(*tasks)
    for channel in opened:
        await channel.close()
    return {"offered_per_s": rate, "sent_per_s": len(tasks) / sent_seconds, "sent": len(tasks),
            "admitted": len(latencies), "failed": codes,
            "p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies else None,
            "p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies else None,
            "max_ms": float(np.max(latencies) * 1000) if latencies else None}


def h2load_run(port: int, method: str, body: bytes, seconds: float, clients: int, streams: int, work: Path,
               name: str, extra: tuple[str, ...] = ()) -> tuple[list[str], Path]:
    """The h2load command that sends the gRPC-framed ``body`` to ``method`` (``clients`` connections,
    ``streams`` calls in flight each, for ``seconds``) and the per-request log it writes (emptied
    first: h2load appends to it); ``name`` keeps the files of concurrent runs apart."""
    framed, log = work / f"{name}.bin", work / f"{name}.tsv"
    framed.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
    log.unlink(missing_ok=True)
    return (["h2load", "-D", str(int(seconds)), "-c", str(clients), "-m", str(streams), *extra,
             "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(framed),
             "--log-file", str(log), f"http://127.0.0.1:{port}{method}"], log)


def answer_percentiles(logs: list[Path]) -> dict[str, float | None]:
    """p50/p99 ms of the answers in h2load's per-request logs (columns: start in microseconds since
    the epoch, HTTP status, microseconds until the end of the answer; HTTP 200 lines only)."""
    answered = [int(fields[2]) / 1000 for log in logs if log.exists() for line in log.read_text().splitlines()
                if len(fields := line.split("\t")) >= 3 and fields[1] == "200"]
    return {"p50_ms": float(np.percentile(answered, 50)) if answered else None,
            "p99_ms": float(np.percentile(answered, 99)) if answered else None}


def answered_ok(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """The Score calls failed between two ``call_counts``, by code, and those answered OK per second."""
    failed = {code: after[code] - before.get(code, 0.0) for code in after if code != "calls"
              if after[code] - before.get(code, 0.0) > 0}
    received = after["calls"] - before["calls"]
    return {"failed": failed, "ok_per_s": (received - sum(failed.values())) / seconds}


def h2load_cell(port: int, method: str, body: bytes, seconds: float, clients: int, streams: int,
                work: Path, rate: float | None = None, metrics_urls: list[str] | None = None) -> dict | None:
    """calls/s of ``method`` under h2load (Debian's nghttp2-client: a C load generator, far cheaper per
    call than a Python client, so the server, not the generator, is what runs out of CPU): ``clients``
    connections with ``streams`` calls in flight each, the gRPC-framed ``body`` every time. None
    without h2load. h2load counts HTTP answers: a gRPC error is one too, so the caller checks the
    server's error counters (``metrics_urls``: calls answered OK per second, and the refusals).
    ``rate``: calls per second in all (h2load's --rps per connection), else as fast as answered.
    Also p50/p99 ms of the calls answered (h2load's per-request log)."""
    import re
    import shutil

    if shutil.which("h2load") is None:
        return None
    before = call_counts(metrics_urls) if metrics_urls else None
    paced = (f"--rps={max(rate / clients, 0.1):.2f}",) if rate else ()
    command, log = h2load_run(port, method, body, seconds, clients, streams, work,
                              method.strip("/").replace("/", "_"), paced)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    after = call_counts(metrics_urls) if metrics_urls else None
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", done.stdout)
    succeeded = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", done.stdout)
    request_time = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", done.stdout)
    if not finished:
        raise SystemExit(f"h2load failed:\n{done.stdout}\n{done.stderr}")
    cell = {"calls_per_s": float(finished.group(1)), "answered": int(succeeded.group(1)) if succeeded else None,
            "request_time_min_max_mean": list(request_time.groups()) if request_time else None,
            **answer_percentiles([log]), "clients": clients, "streams_per_client": streams, "rate": rate}
    if before is not None:
        cell.update(answered_ok(before, after, seconds))
    return cell


def h2load_latency_cell(port: int, bodies: list[bytes], seconds: float, work: Path,
                        metrics_urls: list[str]) -> dict:
    """Latency of Score at concurrency len(bodies): one h2load per body, each one connection with one
    call in flight, all at once, so that concurrent calls are of different users and candidates (one
    h2load repeats one body: its concurrent calls would share the user read and the item lookups of a
    batch). p50/p99 ms over every answer, OK calls/s, the refusals (the server's counters)."""
    before = call_counts(metrics_urls)
    runs = [h2load_run(port, "/plexrec.v1.Scoring/Score", body, seconds, 1, 1, work, f"score_{n}")
            for n, body in enumerate(bodies)]
    started = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for command, _ in runs]
    for run in started:
        run.wait(timeout=seconds + 60)
    return {**answer_percentiles([log for _, log in runs]), **answered_ok(before, call_counts(metrics_urls), seconds),
            "connections": len(bodies)}


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
    times = {"fetch": [], "inputs": [], "forward": [], "eager": []}
    for r, (requests, history) in enumerate(calls):
        # the server's fetch stage: the user's row from the store, the candidates and history items
        # through the (warm) item cache
        started = time.perf_counter()
        user = online.users([users[r % len(users)]])[0]
        online.items([item.item_id for item in requests[0][1]] + user.history_item_ids[-model.history_length:])
        times["fetch"].append(time.perf_counter() - started)
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


def start_server(model_dir: Path, store_dir: Path, processes: int, log_path: Path,
                 max_queue_ms: float | None = None) -> tuple:
    """`plexrec serve --processes N [--max-queue-ms T]` in a process of its own (without T: no time
    target, the deadline and the row bound alone): (the process, target, metrics URLs)."""
    port, metrics_port = free_port(), free_port()
    while port in range(metrics_port, metrics_port + processes):
        metrics_port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "plexrec.cli", "serve", "--model-dir", str(model_dir),
                               "--data-dir", str(store_dir), "--port", str(port), "--metrics-port",
                               str(metrics_port), "--processes", str(processes),
                               "--max-queue-ms", str(max_queue_ms or 0)], cwd=ROOT, stderr=log_path.open("w"))
    return server, port, [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(processes)]


def call_counts(urls: list[str]) -> dict[str, float]:
    """Score calls received and failed (by status code), summed over the workers' metrics."""
    counts: dict[str, float] = {"calls": 0.0}
    for url in urls:
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            # label order is not fixed: `import feast` puts prometheus_client in multi-process mode, which
            # writes labels sorted by name ({code=...,method=...}), not in declared order
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if labels.get("method") != "Score":
                continue
            if line.startswith("plexrec_calls_total{"):
                counts["calls"] += float(line.split()[-1])
            elif line.startswith("plexrec_errors_total{"):
                counts[labels["code"]] = counts.get(labels["code"], 0.0) + float(line.split()[-1])
    return counts


def summed_stages(urls: list[str]) -> dict[str, tuple[float, float]]:
    per_worker = [stage_sums(url) for url in urls]
    return {stage: (sum(w[stage][0] for w in per_worker), sum(w[stage][1] for w in per_worker))
            for stage in per_worker[0]}


def unloaded_cell(results: list[dict], candidates: int) -> dict:
    """The closed-loop cell of one process at its lowest concurrency for calls of ``candidates``."""
    return next(r for r in results if r["processes"] == 1 and r["candidates"] == candidates
                and r["concurrency"] == min(x["concurrency"] for x in results if x["candidates"] == candidates))


def overload_cell(port: int, target: str, metrics_urls: list[str], users, catalogue, contexts, candidates: int,
                  body: bytes, args, work: Path, bare_p50: float, results: list[dict], capacity: float) -> dict:
    """h2load sends ``--overload`` times ``capacity`` (the OK calls/s h2load got as fast as answered)
    for the cell's length; beside it a Python probe sends 20 calls/s of random users and items
    (deadline 1 s) and times the admitted ones: their p50/p99 against the unloaded p99 (the
    concurrency-1 cell). The probe is the measure; h2load, cheap per call, makes the overload."""
    import threading

    unloaded = unloaded_cell(results, candidates)
    rate = args.overload * capacity
    background: dict = {}
    flood = threading.Thread(target=lambda: background.update(h2load_cell(
        port, "/plexrec.v1.Scoring/Score", body, args.seconds + 2, 32, 8, work, rate=rate,
        metrics_urls=metrics_urls)))
    flood.start()
    time.sleep(1.0)  # the flood first
    probe = asyncio.run(open_loop(target, users, catalogue, contexts, candidates, 20.0, args.seconds, seed=candidates,
                                  connections=2))
    flood.join()
    cell = {"candidates": candidates, "overload": args.overload, "capacity_calls_per_s": capacity,
            "offered_per_s": rate, "flood": background, "probe": probe, "unloaded_p99_ms": unloaded["p99_ms"],
            "p99_over_unloaded_p99": probe["p99_ms"] / unloaded["p99_ms"] if probe["p99_ms"] else None,
            "p99_over_bare_round_trip": probe["p99_ms"] / bare_p50 if probe["p99_ms"] else None}
    print(f"1p {candidates:5d} candidates at {args.overload:g}x ({rate:.0f} calls/s offered by h2load, "
          f"{background.get('ok_per_s', 0):.0f}/s answered OK, failed {background.get('failed')}): probe "
          f"{probe['admitted']}/{probe['sent']} admitted, p50 {probe['p50_ms'] or 0:.1f} ms, p99 "
          f"{probe['p99_ms'] or 0:.1f} ms (unloaded p99 {unloaded['p99_ms']:.1f} ms), refused/failed {probe['failed']}",
          flush=True)
    return cell


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
    parser.add_argument("--processes", default="1,2", help="server process counts (plexrec serve --processes)")
    parser.add_argument("--overload", type=float, default=4.0,
                        help="open-loop cells at this multiple of the calls/s the server managed (1 process); "
                             "0: none")
    parser.add_argument("--max-queue-ms", type=float, default=ServeConfig.max_queue_ms,
                        help="the time target of the overload cells' server (beside one without); the other "
                             "cells are served without one, so that they measure capacity, not shedding")
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()
    schema = DatasetSchema.from_yaml(resolve_path(load_config(resolve_path(args.config)).data.schema))
    tables = read_tables(schema)
    users, contexts = callers_and_contexts(tables)
    catalogue = np.unique(tables.items[schema.item].to_numpy(dtype=np.int64))
    results, overload, generator, bare = [], [], [], {}
    alone: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model_dir) if args.model_dir else train_model(args.config, tmp / "run")
        store = open_store("local", tmp / "store")
        load_into_store(store, tables, tmp / "store", history_length=HISTORY)
        for candidates in map(int, args.candidates.split(",")):
            alone[candidates] = in_process(model_dir, store, users, catalogue, contexts, candidates)
            print(f"{candidates:5d} candidates in process: fetch {alone[candidates]['fetch']:.2f}, inputs "
                  f"{alone[candidates]['inputs']:.2f} + forward "
                  f"{alone[candidates]['forward']:.2f} ms; today's eager path {alone[candidates]['eager']:.2f} ms",
                  flush=True)
        for processes in map(int, args.processes.split(",")):
            server, port, metrics_urls = start_server(model_dir, tmp / "store", processes, tmp / "server.log")
            target = f"127.0.0.1:{port}"
            try:
                wait_until_serving(target, server)
                # warm every worker's item cache and model: many connections reach every worker
                asyncio.run(closed_loop(target, users, catalogue, contexts, 1000, 4 * processes, 3.0, seed=99,
                                        connections=4 * processes))
                bare_seconds = min(args.seconds, 3.0)
                round_trips = asyncio.run(bare_round_trips(target, bare_seconds))
                bare[processes] = {
                    "p50_ms": float(np.percentile(round_trips, 50) * 1000),
                    "p99_ms": float(np.percentile(round_trips, 99) * 1000),
                    "calls_per_s_at_32": len(asyncio.run(bare_round_trips(target, bare_seconds, 32))) / bare_seconds}
                bare_p50 = bare[processes]["p50_ms"]
                print(f"{processes} process(es): bare grpc.aio round trip (health check, same server): p50 "
                      f"{bare_p50:.2f} ms; {bare[processes]['calls_per_s_at_32']:,.0f} calls/s at concurrency 32",
                      flush=True)
                from grpc_health.v1 import health_pb2

                rng = np.random.default_rng(7)
                bodies = {c: score_request(rng, users, catalogue, contexts, c).SerializeToString()
                          for c in map(int, args.candidates.split(","))}
                bare_h2load = h2load_cell(port, "/grpc.health.v1.Health/Check",
                                          health_pb2.HealthCheckRequest().SerializeToString(), args.seconds, 16, 8, tmp)
                if bare_h2load is not None:
                    cell = {"processes": processes, "bare": bare_h2load, "score": {}}
                    for candidates, body in bodies.items():
                        # up to 4 calls in flight per connection, fewer where 16 x 4 calls' rows would pass the
                        # server's queue bound (then most calls are refused and the cell measures refusals)
                        streams = max(1, min(4, ServeConfig.max_queued_rows // (16 * candidates)))
                        cell["score"][candidates] = h2load_cell(port, "/plexrec.v1.Scoring/Score", body, args.seconds,
                                                                16, streams, tmp, metrics_urls=metrics_urls)
                        print(f"{processes} process(es) under h2load: Score of {candidates} candidates "
                              f"{cell['score'][candidates]['ok_per_s']:,.0f} calls/s answered OK "
                              f"(failed: {cell['score'][candidates]['failed']}); bare health check "
                              f"{bare_h2load['calls_per_s']:,.0f} calls/s", flush=True)
                    # latency with a generator that leaves the server its core: concurrency c as c h2load
                    # connections with one call in flight each, each its own user and candidates (the Python
                    # client's cells below share the 2 cores with the server)
                    bare_c1 = h2load_cell(port, "/grpc.health.v1.Health/Check",
                                          health_pb2.HealthCheckRequest().SerializeToString(), args.seconds, 1, 1, tmp)
                    cell["bare_c1_p50_ms"], cell["latency"] = bare_c1["p50_ms"], []
                    for candidates in bodies:
                        for concurrency in map(int, args.concurrency.split(",")):
                            timed = h2load_latency_cell(port, [score_request(rng, users, catalogue, contexts,
                                                                             candidates).SerializeToString()
                                                               for _ in range(concurrency)], args.seconds, tmp,
                                                        metrics_urls)
                            cell["latency"].append({"candidates": candidates, "concurrency": concurrency, **timed})
                            print(f"{processes} process(es) under h2load: {candidates} candidates x{concurrency}: p50 "
                                  f"{timed['p50_ms']:.2f} ms  p99 {timed['p99_ms']:.2f} ms  {timed['ok_per_s']:,.0f} "
                                  f"calls/s OK (failed: {timed['failed']}); bare health check p50 "
                                  f"{cell['bare_c1_p50_ms']:.2f} ms", flush=True)
                    generator.append(cell)
                for candidates in map(int, args.candidates.split(",")):
                    fast = alone[candidates]["inputs"] + alone[candidates]["forward"]
                    for concurrency in map(int, args.concurrency.split(",")):
                        before = summed_stages(metrics_urls)
                        latencies, refused = asyncio.run(closed_loop(
                            target, users, catalogue, contexts, candidates, concurrency, args.seconds,
                            seed=candidates + concurrency, connections=min(concurrency, 4 * processes)))
                        after = summed_stages(metrics_urls)
                        stages = {stage: 1000 * (after[stage][0] - before[stage][0])
                                  / max(after[stage][1] - before[stage][1], 1) for stage in STAGES}
                        # each call observes the size of the batch it was scored in: a call-weighted mean
                        calls_per_batch = ((after["batch_calls"][0] - before["batch_calls"][0])
                                           / max(after["batch_calls"][1] - before["batch_calls"][1], 1))
                        p50 = float(np.percentile(latencies, 50) * 1000)
                        p99 = float(np.percentile(latencies, 99) * 1000)
                        row = {"processes": processes, "candidates": candidates, "concurrency": concurrency,
                               "calls": len(latencies), "refused": refused,
                               "calls_per_s": len(latencies) / args.seconds, "p50_ms": p50, "p99_ms": p99,
                               "server_mean_ms": stages, "calls_per_batch": calls_per_batch,
                               "bare_round_trip_p50_ms": bare_p50, "model_alone_p50_ms": alone[candidates],
                               "eager_over_fast": alone[candidates]["eager"] / fast,
                               "p50_over_bare_round_trip": p50 / bare_p50, "p99_over_bare_round_trip": p99 / bare_p50,
                               "p50_over_model_alone": p50 / fast,
                               "fetch_over_in_process": stages["feature_fetch"] / alone[candidates]["fetch"],
                               "inputs_over_in_process": stages["model_inputs"] / alone[candidates]["inputs"],
                               "forward_over_in_process": stages["forward"] / alone[candidates]["forward"]}
                        results.append(row)
                        print(f"{processes}p {candidates:5d} candidates x{concurrency:2d}: p50 {p50:7.2f} ms  p99 "
                              f"{p99:7.2f} ms  {row['calls_per_s']:7.1f} calls/s ({refused} refused)  server: fetch "
                              f"{stages['feature_fetch']:.2f} / inputs {stages['model_inputs']:.2f} / forward "
                              f"{stages['forward']:.2f} ms per batch of {calls_per_batch:.1f} calls", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=60)
        if args.overload and generator:
            # one process: with the time target --max-queue-ms (default: the server's), without one (the
            # deadline and the row bound alone), and with a target of the unloaded p50 of the call's size (an
            # admitted call waits up to the target, then for the batch in progress and its own scoring: a
            # target of about one call's latency is what keeps it within 2x of unloaded)
            setups = [("flag", args.max_queue_ms, list(bodies)), ("none", None, list(bodies))]
            setups += [("unloaded_p50", round(unloaded_cell(results, c)["p50_ms"], 1), [c]) for c in bodies]
            for kind, max_queue_ms, sizes in setups:
                server, port, metrics_urls = start_server(model_dir, tmp / "store", 1, tmp / "server.log",
                                                          max_queue_ms)
                target = f"127.0.0.1:{port}"
                try:
                    wait_until_serving(target, server)
                    asyncio.run(closed_loop(target, users, catalogue, contexts, 1000, 4, 3.0, seed=99, connections=4))
                    for candidates in sizes:
                        cell = overload_cell(port, target, metrics_urls, users, catalogue, contexts, candidates,
                                             bodies[candidates], args, tmp, bare[1]["p50_ms"], results,
                                             generator[0]["score"][candidates]["ok_per_s"])
                        overload.append({"target": kind, "max_queue_ms": max_queue_ms, **cell})
                finally:
                    server.terminate()
                    server.wait(timeout=60)
    write_json(args.out, {"benchmark": "serving", "measured_at": now(), "machine": machine(),
                          "schema": schema.name, "config": args.config, "history_length": HISTORY,
                          "seconds_per_cell": args.seconds, "goals": GOALS, "bare_round_trip": bare,
                          "model_alone_p50_ms": alone, "results": results, "overload": overload,
                          "h2load": generator})
    print("\n| processes | candidates | concurrency | p50 | p99 | calls/s | server: fetch / inputs / forward (mean) "
          "| p50 / bare gRPC | p99 / bare gRPC | fetch, inputs, forward / in process |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["server_mean_ms"]
        print(f"| {r['processes']} | {r['candidates']:,} | {r['concurrency']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
              f"{r['calls_per_s']:,.0f} | {s['feature_fetch']:.2f} / {s['model_inputs']:.2f} / {s['forward']:.2f} ms | "
              f"{r['p50_over_bare_round_trip']:.1f}x | {r['p99_over_bare_round_trip']:.1f}x | "
              f"{r['fetch_over_in_process']:.1f}x, {r['inputs_over_in_process']:.1f}x, {r['forward_over_in_process']:.1f}x |")
    if overload:
        print("\n| --max-queue-ms | candidates | h2load offers (x capacity) | answered OK | refused | probe admitted "
              "| probe p50 | probe p99 | unloaded p99 | p99 / unloaded p99 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for o in overload:
            flood, probe = o["flood"], o["probe"]
            print(f"| {o['max_queue_ms'] or 'none'} | {o['candidates']:,} | {o['offered_per_s']:.0f}/s ({o['overload']:g}x) | "
                  f"{flood.get('ok_per_s', 0):.0f}/s | {flood.get('failed')} | {probe['admitted']}/{probe['sent']} | "
                  f"{probe['p50_ms'] or 0:.1f} ms | {probe['p99_ms'] or 0:.1f} ms | {o['unloaded_p99_ms']:.1f} ms | "
                  f"{o['p99_over_unloaded_p99'] or 0:.2f}x |")
    if generator:
        print("\n| processes | h2load: bare health check calls/s | " + " | ".join(
            f"Score ({c} candidates) OK calls/s" for c in generator[0]["score"]) + " |")
        print("|---|---|" + "---|" * len(generator[0]["score"]))
        for g in generator:
            print(f"| {g['processes']} | {g['bare']['calls_per_s']:,.0f} | " + " | ".join(
                f"{cell['ok_per_s']:,.0f} ({cell['ok_per_s'] / g['bare']['calls_per_s']:.2f} of bare)"
                for cell in g["score"].values()) + " |")
        print("\n| processes | candidates | concurrency (h2load connections) | p50 | p99 | calls/s OK | failed "
              "| p50 / bare h2load p50 |")
        print("|---|---|---|---|---|---|---|---|")
        for g in generator:
            for t in g["latency"]:
                # h2load times every answer: with refusals (gRPC errors are HTTP 200 too) they are in the
                # percentiles, so such a cell's latency is not the admitted calls'
                mixed = " (refusals included)" if t["failed"] else ""
                print(f"| {g['processes']} | {t['candidates']:,} | {t['concurrency']} | {t['p50_ms']:.1f} ms{mixed} | "
                      f"{t['p99_ms']:.1f} ms{mixed} | {t['ok_per_s']:,.0f} | {t['failed'] or 0} | "
                      f"{t['p50_ms'] / g['bare_c1_p50_ms']:.1f}x |")
    print("\ngoals (issue 24, this machine; latency goals with both load generators):")
    for goal in GOALS:
        if goal["metric"] == "h2load_calls_per_s":
            row = next((g for g in generator if g["processes"] == goal["processes"]), None)
            value = row["score"][100]["ok_per_s"] if row and 100 in row["score"] else None
        elif goal["metric"] == "p99_over_unloaded_p99":
            rows = [o for o in overload if o["candidates"] == goal["candidates"] and o["max_queue_ms"]
                    and o["p99_over_unloaded_p99"] is not None]
            row = min(rows, key=lambda o: o["p99_over_unloaded_p99"], default=None)  # the best time target run
            value = row["p99_over_unloaded_p99"] if row else None
            if row:
                goal = {**goal, "max_queue_ms": row["max_queue_ms"]}
        else:
            row = next((r for r in results if r["processes"] == 1 and r["candidates"] == goal["candidates"]
                        and r["concurrency"] == goal["concurrency"]), None)
            value = row[goal["metric"]] if row else None
            for g in generator:  # per process count: more processes is what --processes is for
                for t in g["latency"]:
                    if t["candidates"] == goal["candidates"] and t["concurrency"] == goal["concurrency"]:
                        report_goal({**goal, "client": "h2load", "processes": g["processes"]}, t[goal["metric"]])
            goal = {**goal, "client": "python grpc.aio"}
        report_goal(goal, value)


def report_goal(goal: dict, value: float | None) -> None:
    if value is not None:
        met = value <= goal["at_most"] if "at_most" in goal else value >= goal["at_least"]
        bound = f"<= {goal['at_most']}" if "at_most" in goal else f">= {goal['at_least']}"
        print(f"  {goal}: {value:.2f} (goal {bound}): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
