"""Freshness: what learning from the stream is worth (and, as another part, how fast events reach the model).

    .venv/bin/python bench/freshness.py --part quality [--datasets ml100k kuairand] [--seeds 3]
                                        [--windows 10] [--epochs N] [--out bench/results/freshness_quality.json]
    .venv/bin/python bench/freshness.py --part freshness [--rates 100,1000] [--seconds 60]
                                        [--export-seconds S --export-events N --reload-seconds S]
                                        [--work-dir DIR] [--freshness-out bench/results/freshness.json]
    .venv/bin/python bench/freshness.py --part all       # both, each into its own JSON

quality: prequential (test-then-train) evaluation in event-time order. A data set's events are cut
once in time, as ``plexrec train`` cuts them with ``data.split: time``: the first 80% is the past (the
first 70% trains, the next 10% validates; ``Trainer.fit`` runs the config's epochs, or ``--epochs``,
and keeps the epoch with the best validation AUC), the latest 20% is the stream, cut into ``--windows``
consecutive windows of equal event counts. Both models start as that best epoch: the frozen one stays
so; the updated one is a ``ContinualLearner`` resumed from the best epoch's checkpoint (same config,
features, optimizers and optimizer state). For each window in time order: the AUC of both models on
it, before the updated one has seen it, then the updated one learns it (one pass, in time order, the
config's batch size). Features are those of each event's time (histories and counters strictly before
it) for both models. Per data set and seed: the mean window AUC of each and the gap (updated - frozen);
mean ± standard deviation over seeds, per-window curves, JSON, a Markdown table and a plot (PNG next to
the JSON). Window 1 is scored before any update, so there both models are the same model by
construction (the run checks it): its gap is 0 and it counts in the means.

freshness: from an event's produce time until a served model has trained on it, through the real
services on loopback, each its own process as a user runs them: the embedded broker (tansu),
`plexrec ingest`, `plexrec learn` and `plexrec serve`, with their own defaults (embedded defaults:
learn --export-seconds 30 --export-events 5000 --poll-seconds 2, serve --reload-seconds 5) unless
flags say otherwise. MovieLens 100K is cut once in time (as the quickstart cuts it): the first part
goes into a local (SQLite) Feast store and trains a 1-epoch model from the store's point-in-time
examples (configs/ml100k_sequence.yaml), whose item embeddings are published; the later events are
streamed as the data set's RATING events in time order: a warm-up (--warmup-events at 100/s, until
served: the learner's first window builds it), then each of --rates for --seconds (60 s: 6,000 and
60,000 events, so the store holds about the first 33,700), each followed by a drain until every event of
the rate is served (at most --drain-seconds). The bench records each event's produce time, polls
Score every --poll-ms (time, model_version), watches the ingester's batch files (when each event was
logged, at which position/offset) and the versions under models/ (when each became visible, the
offsets its manifest's metrics.continual.position.offsets record). An event is trained on by a
version whose offsets are at or past its logged (position, offset); its freshness is the first Score
answer with such a version minus its produce time (an event never covered counts as infinite, so a
percentile it reaches reads "—"). Per rate: p50 / p99 / max, events covered, the stages (produce ->
logged -> learned: the end of the learner window that took it, from learn's log -> exported ->
served), the learner's steps (compaction, learning, the rest: reading the log and building the
point-in-time examples; export and publish), the cores each process kept busy, and whether the goal
(p50 <= 30 s, issue 15) is met. JSON (--freshness-out) and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from common import machine, now, summarise, write_json

from recsys.logs import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.continual import ContinualLearner, time_windows  # noqa: E402
from recsys.data.dataset import load_dataset  # noqa: E402
from recsys.metrics import auc, ranking_metrics  # noqa: E402
from recsys.train import Trainer  # noqa: E402

DATASETS = {"ml100k": "configs/ml100k_sequence.yaml", "kuairand": "configs/kuairand.yaml"}
PAST, STREAM = 0.8, 0.2  # of the events, in time order
VALID = 0.1  # the last 10% of events before the stream: the Trainer's validation (best epoch)


def prequential_run(config, examples, windows: int, out_dir: Path) -> dict:
    """One seed: fit on the past, then test-then-train over the stream's windows."""
    started = time.perf_counter()
    trainer = Trainer(config, examples=examples, out_dir=out_dir)
    fit = trainer.fit(progress=False)  # the trainer now holds the best epoch's weights: the frozen model
    fit_seconds = time.perf_counter() - started
    best = out_dir / "checkpoints" / fit["valid"]["checkpoint"]
    learner = ContinualLearner.from_checkpoint(trainer.config, best, examples, out_dir=out_dir)
    stream = time_windows(trainer.eval_examples["test"], windows)
    start_gap = float(np.abs(learner.predict(stream[0]) - trainer.predict(stream[0])).max())
    if start_gap > 1e-5:
        raise AssertionError(f"the updated model does not start as the frozen one (max score gap {start_gap})")

    per_window, scores, learn_seconds = [], {"frozen": [], "updated": [], "label": []}, 0.0
    for i, window in enumerate(stream):
        frozen, updated = trainer.predict(window), learner.predict(window)  # test ...
        tick = time.perf_counter()
        learned = learner.learn(window)  # ... then train
        learn_seconds += time.perf_counter() - tick
        scores["frozen"].append(frozen), scores["updated"].append(updated), scores["label"].append(window.label)
        per_window.append({
            "window": i + 1, "events": len(window), "positive_rate": float(window.label.mean()),
            "time_from": int(window.timestamp.min()), "time_to": int(window.timestamp.max()),
            "frozen": ranking_metrics(window.user_id, window.label, frozen),
            "updated": ranking_metrics(window.user_id, window.label, updated),
            "learn_loss": learned.loss})
    labels = np.concatenate(scores["label"])
    mean_frozen = float(np.mean([w["frozen"]["auc"] for w in per_window]))
    mean_updated = float(np.mean([w["updated"]["auc"] for w in per_window]))
    return {
        "best_epoch": fit["best_epoch"], "epochs": fit["epochs"], "valid_auc": fit["valid"]["valid_auc"],
        "past_examples": len(trainer.train_examples) + len(trainer.eval_examples["valid"]),
        "stream_examples": len(labels),
        "frozen_window_auc": mean_frozen, "updated_window_auc": mean_updated, "gap": mean_updated - mean_frozen,
        "windows_updated_better": sum(w["updated"]["auc"] > w["frozen"]["auc"] for w in per_window),
        "frozen_stream_auc": auc(labels, np.concatenate(scores["frozen"])),
        "updated_stream_auc": auc(labels, np.concatenate(scores["updated"])),
        "start_max_score_gap": start_gap,
        "fit_seconds": round(fit_seconds, 1), "learn_seconds": round(learn_seconds, 1),
        "learn_examples_per_s": round(len(labels) / learn_seconds),
        "windows": per_window,
    }


def curves(runs: list[dict]) -> list[dict]:
    """Per window: mean and std over seeds of both models' AUC and of the gap."""
    out = []
    for i in range(len(runs[0]["windows"])):
        frozen = np.array([r["windows"][i]["frozen"]["auc"] for r in runs])
        updated = np.array([r["windows"][i]["updated"]["auc"] for r in runs])
        ddof = 1 if len(runs) > 1 else 0
        out.append({"window": i + 1, "events": runs[0]["windows"][i]["events"],
                    **{name: {"mean": float(v.mean()), "std": float(v.std(ddof=ddof))}
                       for name, v in (("frozen_auc", frozen), ("updated_auc", updated), ("gap", updated - frozen))}})
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for axis, (name, result) in zip(axes[0], results.items()):
        x = [c["window"] for c in result["curves"]]
        for model, colour in (("frozen", "tab:grey"), ("updated", "tab:blue")):
            mean = np.array([c[f"{model}_auc"]["mean"] for c in result["curves"]])
            std = np.array([c[f"{model}_auc"]["std"] for c in result["curves"]])
            overall = result["summary"][f"{model}_window_auc"]["mean"]
            axis.plot(x, mean, marker="o", color=colour, label=f"{model} ({overall:.4f})")
            axis.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2)
        axis.set_title(f"{name}: {result['seeds']} seeds, gap {result['summary']['gap']['mean']:+.4f}")
        axis.set_xlabel(f"window of the latest {STREAM:.0%} of events, in time order")
        axis.set_ylabel("AUC before learning the window")
        axis.grid(alpha=0.3), axis.legend()
    fig.suptitle("prequential AUC: frozen model vs continually updated (test, then train)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def quality(args) -> None:
    results, started = {}, time.perf_counter()
    for name in args.datasets:
        overrides = {"data.split": "time", "data.valid_fraction": VALID, "data.test_fraction": STREAM,
                     "train.checkpoint_every_epoch": False}
        if args.epochs is not None:
            overrides["train.epochs"] = args.epochs
        base = load_config(DATASETS[name], overrides)
        examples, schema = load_dataset(base.data)
        runs = []
        for seed in range(args.seeds):
            out_dir = Path(tempfile.mkdtemp(prefix=f"plexrec-freshness-{name}-"))
            try:
                run = prequential_run(load_config(DATASETS[name], {**overrides, "train.seed": seed}), examples,
                                      args.windows, out_dir)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
            runs.append({"seed": seed, **run})
            print(f"{name} seed {seed}: mean window AUC frozen {run['frozen_window_auc']:.4f} updated "
                  f"{run['updated_window_auc']:.4f} (gap {run['gap']:+.4f}, {run['windows_updated_better']}/"
                  f"{args.windows} windows better); best epoch {run['best_epoch']}/{run['epochs']}, fit "
                  f"{run['fit_seconds']:.0f} s, learning {run['learn_examples_per_s']} events/s", flush=True)
        (summary,) = summarise(runs, [], ["frozen_window_auc", "updated_window_auc", "gap", "frozen_stream_auc",
                                          "updated_stream_auc", "windows_updated_better", "best_epoch",
                                          "fit_seconds", "learn_examples_per_s"])
        results[name] = {"dataset": schema.name, "config": DATASETS[name], "epochs": base.train.epochs,
                         "batch_size": base.train.batch_size, "embedding": base.embedding.kind,
                         "sequence": base.sequence.mode, "events": len(examples), "seeds": args.seeds,
                         "summary": summary, "curves": curves(runs), "runs": runs}

    out = Path(args.out)
    write_json(out, {
        "benchmark": "freshness_quality", "measured_at": now(), "machine": machine(),
        "protocol": {"order": "event time (stable sort of timestamps)", "past": PAST, "stream": STREAM,
                     "valid": f"the last {VALID:.0%} of events before the stream (best-epoch selection)",
                     "windows": args.windows, "evaluation": "test-then-train: each window scored by both "
                     "models before the updated one learns it (one pass, time order, the config's batch size)"},
        "seconds": round(time.perf_counter() - started, 1), "results": results,
    })
    plot(results, out.with_suffix(".png"))

    print("\n| data set | events (stream) | epochs | frozen: mean window AUC | updated | gap (updated − frozen) "
          "| windows updated better | stream AUC frozen | stream AUC updated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["summary"]
        print(f"| {r['dataset']} ({r['sequence']}) | {r['events']:,} ({r['runs'][0]['stream_examples']:,}) | "
              f"{r['epochs']} | {_pm(s['frozen_window_auc'])} | {_pm(s['updated_window_auc'])} | "
              f"{_pm(s['gap'], '+')} | {s['windows_updated_better']['mean']:.1f}/{args.windows} | "
              f"{_pm(s['frozen_stream_auc'])} | {_pm(s['updated_stream_auc'])} |")
    for name, r in results.items():
        print(f"\n{r['dataset']}, per window (mean ± std over {r['seeds']} seeds)\n\n| window | events | frozen AUC "
              "| updated AUC | gap |\n|---|---|---|---|---|")
        for c in r["curves"]:
            print(f"| {c['window']} | {c['events']:,} | {_pm(c['frozen_auc'])} | {_pm(c['updated_auc'])} | "
                  f"{_pm(c['gap'], '+')} |")


def _pm(value: dict, sign: str = "") -> str:
    return f"{value['mean']:{sign}.4f} ± {value['std']:.4f}"


# --- freshness: event -> served model, through the real services ---

FRESHNESS_GOAL_P50_S = 30.0  # issue 15 item 4
FRESHNESS_TOPIC = "user-events"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")
LEARNED_LINE = re.compile(r"learned (\d+) events \(log loss before learning them \S+\) in ([\d.]+) s, up to event "
                          r"time .*?; (.*); ([\d.]+) s$")
EXPORTED_LINE = re.compile(r"exported (\S+) \((\d+) events learned in all")
SAME_STEP_S = 2.0  # an export this soon after a window's log line was due in that window's step


class StackWatch:
    """What the bench sees of the running stack, from its own threads: the ingester's batch files
    (when each was written, which events it holds, where they were read), the exported versions
    (when each became visible, the offsets its manifest records) and the server's answers
    (time sent, time answered, model_version)."""

    def __init__(self, log_dir: Path, models: Path) -> None:
        self.log_dir, self.models = log_dir, models
        self.batches: dict[str, dict] = {}  # batch file name -> {written, seen, events}
        self.missed_batches: set[str] = set()  # gone (compacted) before the bench could read them
        self.versions: dict[str, dict] = {}  # version -> {visible, created_at, offsets, examples}
        self.answers: list[tuple[float, float, str | None]] = []
        self.logged: dict[str, tuple[float, str, int]] = {}  # event id -> (written, position, offset)
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def watch_files(self, interval: float = 0.05) -> None:
        import pandas as pd

        from features.event_log import positions
        from recsys.export import read_manifest, version_directories
        from recsys.learn import learned_offsets

        while not self.stop.is_set():
            for path in sorted(self.log_dir.glob("batch-*.parquet")) if self.log_dir.is_dir() else []:
                if path.name in self.batches or path.name in self.missed_batches:
                    continue
                seen = time.time()
                try:
                    frame = pd.read_parquet(path, columns=["event_id", "source", "partition", "offset"])
                except (FileNotFoundError, OSError):
                    self.missed_batches.add(path.name)
                    continue
                written = int(path.name.split("-")[1]) / 1e9  # the ingester names it by time.time_ns()
                where = positions(frame).tolist()
                with self.lock:
                    self.batches[path.name] = {"written": written, "seen": seen, "events": len(frame)}
                    for event_id, position, offset in zip(frame["event_id"], where, frame["offset"].tolist()):
                        self.logged.setdefault(event_id, (written, position, int(offset)))
            if self.models.is_dir():
                for directory in version_directories(self.models)[0]:
                    if directory.name in self.versions:
                        continue
                    seen = time.time()
                    manifest = read_manifest(directory)
                    continual = (manifest.get("metrics") or {}).get("continual") or {}
                    self.versions[manifest["model_version"]] = {
                        "visible": seen, "created_at": manifest.get("created_at"),
                        "offsets": learned_offsets(manifest), "examples": continual.get("examples")}
            time.sleep(interval)

    def poll_server(self, target: str, user: int, items: list[int], context: dict, interval: float) -> None:
        import grpc

        from serving.client import ScoringClient

        with ScoringClient(target, timeout=10) as client:
            while not self.stop.is_set():
                sent = time.time()
                try:
                    _, version = client.score(user, items, context=context)
                except grpc.RpcError:
                    version = None
                self.answers.append((sent, time.time(), version))
                self.stop.wait(max(0.0, sent + interval - time.time()))

    def served_version(self) -> str | None:
        for _, _, version in reversed(self.answers):
            if version is not None:
                return version
        return None

    def covered(self, event_ids: list[str]) -> int:
        """How many of the events the version the server answers with now has learned."""
        version = self.served_version()
        offsets = self.versions.get(version, {}).get("offsets", {}) if version else {}
        with self.lock:
            found = [self.logged.get(e) for e in event_ids]
        return sum(1 for f in found if f is not None and offsets.get(f[1], -1) >= f[2])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The embedded broker's process: the bench's child running tansu."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid() and \
                    b"tansu" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, ValueError):
            continue
    return None


def cpu_snapshot(pids: dict[str, int | None]) -> tuple[float, dict[str, float | None]]:
    return time.monotonic(), {name: cpu_seconds(pid) if pid else None for name, pid in pids.items()}


def cores_used(before: tuple, after: tuple) -> dict[str, float | None]:
    """Per process, the cores it kept busy between two snapshots (CPU seconds / wall seconds)."""
    wall = after[0] - before[0]
    return {name: (round((after[1][name] - before[1][name]) / wall, 2)
                   if before[1][name] is not None and after[1][name] is not None else None) for name in before[1]}


def produce_steadily(producer, events: list, rate: float) -> np.ndarray:
    """Send ``events`` at ``rate`` per second (paced on the monotonic clock, no catching up in bursts
    beyond what the schedule says); each event's wall-clock produce time."""
    times = np.empty(len(events))
    started = time.monotonic()
    for i, event in enumerate(events):
        wait = started + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        times[i] = time.time()
        producer.send(event)
    producer.producer.flush()
    return times


def first_covering(positions: np.ndarray, offsets: np.ndarray, ordered: list[tuple[float, dict]]) -> np.ndarray:
    """Per event (its position and offset), the time of the first of ``ordered`` ((time, offsets) in
    time order) whose offsets are at or past it; inf where none is."""
    result = np.full(len(offsets), np.inf)
    if not ordered:
        return result
    times = np.array([t for t, _ in ordered] + [np.inf])
    for position in np.unique(positions):
        mask = positions == position
        marks = np.maximum.accumulate(np.array([o.get(position, -1) for _, o in ordered], dtype=np.int64))
        result[mask] = times[np.searchsorted(marks, offsets[mask], side="left")]
    return result


def nearest_rank(values: np.ndarray, q: float) -> float | None:
    """The q-quantile by nearest rank over all values (inf: an event never covered); None when it is inf."""
    if not len(values):
        return None
    ordered = np.sort(values)
    value = ordered[max(0, int(np.ceil(q * len(ordered))) - 1)]
    return None if not np.isfinite(value) else float(value)


def stats(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {"p50": nearest_rank(values, 0.5), "p99": nearest_rank(values, 0.99),
            "max": float(finite.max()) if len(finite) and len(finite) == len(values) else None,
            "mean": float(finite.mean()) if len(finite) else None, "measured": len(finite)}


def read_process_log(path: Path) -> list[tuple[float, str, str]]:
    """(epoch seconds, logger, message) per line of a plexrec process's log."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append((stamp, match.group(2), match.group(4)))
    return lines


def learn_windows(path: Path) -> tuple[list[dict], list[dict]]:
    """The learner's windows (end time, events, learn and compaction seconds, the compaction summary)
    and exports (time, version), from its log."""
    windows, exports = [], []
    for stamp, _, message in read_process_log(path):
        if (match := LEARNED_LINE.match(message)):
            windows.append({"end": stamp, "events": int(match.group(1)), "learn_s": float(match.group(2)),
                            "compaction_s": float(match.group(4)), "compaction": match.group(3)})
        elif (match := EXPORTED_LINE.match(message)):
            exports.append({"time": stamp, "version": match.group(1), "examples": int(match.group(2))})
    for i, window in enumerate(windows):  # an export in the same step follows its window's line
        # within SAME_STEP_S of the window's line: exported in its step (a later, idle step first
        # sleeps --poll-seconds and compacts)
        until = min(windows[i + 1]["end"] if i + 1 < len(windows) else np.inf, window["end"] + SAME_STEP_S)
        done = [e["time"] for e in exports if window["end"] <= e["time"] < until]
        window["export_s"] = done[0] - window["end"] if done else None
        # back to back while events flow: a step starts where the previous one ended
        if i:
            previous = windows[i - 1]
            window["gap_s"] = window["end"] - previous["end"] - (previous["export_s"] or 0.0)
        else:
            window["gap_s"] = None
    return windows, exports


def window_of_each_batch(batches: dict[str, dict], windows: list[dict]) -> dict[str, float] | None:
    """Batch file -> the end time of the learner window that learned it: a window takes every batch
    file on disk when its compaction starts, so windows cover consecutive batch files (by name, the
    order compaction reads them). None when the counts do not line up (a batch the bench missed)."""
    ordered = sorted(batches)
    result, j = {}, 0
    for window in windows:
        taken = 0
        while taken < window["events"] and j < len(ordered):
            taken += batches[ordered[j]]["events"]
            result[ordered[j]] = window["end"]
            j += 1
        if taken != window["events"]:
            return None
    return result


def analyse_phase(name: str, rate: float, event_ids: list[str], produced: np.ndarray, watch: StackWatch,
                  logged: dict[str, tuple[str, int]], window_ends: dict[str, float], span: tuple[float, float],
                  windows: list[dict]) -> dict:
    """Freshness of one phase's events: produce -> logged -> learned (window) -> exported -> served."""
    found = [logged.get(e) for e in event_ids]
    known = np.array([f is not None for f in found])
    positions = np.array([f[0] if f else "" for f in found], dtype=object)
    offsets = np.array([f[1] if f else np.iinfo(np.int64).max for f in found], dtype=np.int64)
    versions = sorted(((v["visible"], v["offsets"]) for v in watch.versions.values()), key=lambda x: x[0])
    first_answer: dict[str, float] = {}
    for _, answered, version in watch.answers:
        if version is not None:
            first_answer.setdefault(version, answered)
    served = sorted(((t, watch.versions.get(v, {}).get("offsets", {})) for v, t in first_answer.items()),
                    key=lambda x: x[0])
    exported_at = first_covering(positions, offsets, versions)
    served_at = first_covering(positions, offsets, served)
    written = {e: w for e, (w, _, _) in ((e, watch.logged[e]) for e in event_ids if e in watch.logged)}
    logged_at = np.array([written.get(e, np.nan) for e in event_ids])
    freshness = served_at - produced
    freshness[~known] = np.inf
    stages = {"produce_to_logged": logged_at - produced, "logged_to_exported": exported_at - logged_at,
              "exported_to_served": served_at - exported_at}
    if window_ends:
        learned = np.array([window_ends.get(e, np.nan) for e in event_ids])
        stages["logged_to_learned"] = learned - logged_at
        stages["learned_to_exported"] = exported_at - learned
    breakdown = {k: stats(v[~np.isnan(v)]) for k, v in stages.items()}
    in_phase = [w for w in windows if span[0] <= w["end"] <= span[1]]
    versions_in_phase = sorted(v for v, t in first_answer.items() if span[0] <= t <= span[1])
    visible = sorted(v["visible"] for v in watch.versions.values() if span[0] <= v["visible"] <= span[1])
    return {
        "phase": name, "rate_per_s": rate, "events": len(event_ids),
        "produce_seconds": float(produced[-1] - produced[0]) if len(produced) > 1 else 0.0,
        "achieved_rate_per_s": float((len(produced) - 1) / max(produced[-1] - produced[0], 1e-9)),
        "in_event_log": int(known.sum()), "covered": int(np.isfinite(freshness).sum()),
        "freshness_s": stats(freshness), "breakdown_s": breakdown,
        "versions_served": len(versions_in_phase),
        "export_interval_s": float(np.mean(np.diff(visible))) if len(visible) > 1 else None,
        "windows": summarise_windows(in_phase),
    }


def summarise_windows(windows: list[dict]) -> dict:
    if not windows:
        return {"count": 0}
    def mean_max(key):
        values = [w[key] for w in windows if w.get(key) is not None]
        return {"mean": float(np.mean(values)), "max": float(np.max(values))} if values else None
    for w in windows:
        if w.get("gap_s") is not None:
            w["other_s"] = w["gap_s"] - w["learn_s"] - w["compaction_s"]
    return {"count": len(windows), "events": mean_max("events"), "step_s": mean_max("gap_s"),
            "compaction_s": mean_max("compaction_s"), "learn_s": mean_max("learn_s"),
            "examples_and_reading_s": mean_max("other_s"), "export_and_publish_s": mean_max("export_s"),
            "last_compaction": windows[-1]["compaction"]}


def freshness(args) -> None:
    """Event -> served model freshness through the real stack (see the module's doc)."""
    from contextlib import ExitStack

    from features.broker import embedded_broker
    from features.event_log import log_dir, positions, read_event_log
    from features.events import EventProducer, schema_events
    from features.load import load_into_store
    from features.store import open_store
    from features.training import examples_from_store
    from features.examples import SplitRule
    from features.schema import DatasetSchema
    from features.datasets import read_tables
    from recsys.item_embeddings import publish_model_embeddings
    from recsys.learn import LearnConfig
    from plexrec.local_stack import start_services, wait_for
    from plexrec.quickstart import MOVIELENS_SCHEMA, request_context, run_config_for, split_by_time
    from serving.server import ServeConfig

    started = time.perf_counter()
    rates = [float(r) for r in args.rates.split(",")]
    per_phase = [int(rate * args.seconds) for rate in rates]
    needed = args.warmup_events + sum(per_phase)
    schema = DatasetSchema.from_yaml(MOVIELENS_SCHEMA)
    tables = read_tables(schema)
    frame = tables.interactions
    if needed > 0.9 * len(frame):
        raise SystemExit(f"{needed:,} events to stream, but {schema.name} has {len(frame):,}: lower --seconds")
    past, future = split_by_time(frame, needed / len(frame), schema.timestamp)
    future = future.iloc[:needed]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="plexrec-freshness-"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    store_dir, run_dir = work / "store", work / "run"
    config = run_config_for(MOVIELENS_SCHEMA, None, {"train.out_dir": str(run_dir), "train.epochs": 1})
    print(f"{schema.name}: {len(past):,} interactions before the cut (store + a 1-epoch model), {needed:,} after it "
          f"streamed ({args.warmup_events} warm-up, then {', '.join(f'{n:,} at {r:g}/s' for n, r in zip(per_phase, rates))}); "
          f"work dir {work}", flush=True)

    store = open_store("local", store_dir)
    load_into_store(store, tables.with_interactions(past), store_dir, history_length=max(config.data.max_history, 1))
    trainer = Trainer(config, examples=examples_from_store(store, store_dir, split=SplitRule.of(config.data)))
    fit = trainer.fit(progress=False)
    publish_model_embeddings(fit["model_dir"], store, store_dir)
    setup_seconds = time.perf_counter() - started
    print(f"store loaded, model trained (test AUC {fit['test']['auc']:.4f}) and published in {setup_seconds:.0f} s",
          flush=True)

    learn_flags = []
    if args.export_seconds is not None:
        learn_flags += ["--export-seconds", str(args.export_seconds)]
    if args.export_events is not None:
        learn_flags += ["--export-events", str(args.export_events)]
    if args.learn_poll_seconds is not None:
        learn_flags += ["--poll-seconds", str(args.learn_poll_seconds)]
    serve_flags = ["--reload-seconds", str(args.reload_seconds)] if args.reload_seconds is not None else []
    defaults = LearnConfig(model_dir="")
    settings = {"export_seconds": args.export_seconds or defaults.export_seconds,
                "export_events": args.export_events or defaults.export_events,
                "learn_poll_seconds": args.learn_poll_seconds or defaults.poll_seconds,
                "reload_seconds": args.reload_seconds or ServeConfig(model_dir="").reload_seconds}
    embedded_defaults = not (learn_flags or serve_flags)

    watch = StackWatch(log_dir(store_dir), run_dir / "models")
    phases, timeline = [], {}
    with ExitStack() as stack:
        bootstrap = stack.enter_context(embedded_broker())
        services = start_services(stack, bootstrap=bootstrap, topic=FRESHNESS_TOPIC, group="plexrec-freshness",
                                  store_dir=store_dir, models=run_dir / "models", logs=work / "logs",
                                  serve_flags=serve_flags, learn_flags=learn_flags)
        stack.callback(watch.stop.set)  # the threads stop before the processes do
        children, target = services.children, services.target
        wait_for(lambda: "starting from the served version" in (work / "logs" / "learn.log").read_text()
                 or "resuming from" in (work / "logs" / "learn.log").read_text(), "plexrec learn to start", 180,
                 children)
        behaviours = past[past["rating"] >= schema.rating_threshold] if schema.rating else past
        user = int(behaviours[schema.user].value_counts().index[0])
        items = [int(i) for i in behaviours[schema.item].value_counts().index[:20]]
        context = request_context(past[past[schema.user] == user], schema)
        threads = [threading.Thread(target=watch.watch_files, daemon=True),
                   threading.Thread(target=watch.poll_server, args=(target, user, items, context,
                                                                    args.poll_ms / 1000), daemon=True)]
        for thread in threads:
            thread.start()
        producer = EventProducer(bootstrap, FRESHNESS_TOPIC)
        stack.callback(producer.close)
        events = schema_events(future, schema)
        chunks, start = [], 0
        for name, rate, count in [("warm-up", 100.0, args.warmup_events),
                                  *((f"{r:g}/s", r, n) for r, n in zip(rates, per_phase))]:
            chunks.append((name, rate, events[start:start + count]))
            start += count
        pids = {"ingest": children["ingester"].pid, "learn": children["learner"].pid,
                "serve": children["server"].pid, "broker": broker_pid(), "bench (producer + poller)": os.getpid()}
        cpu = {}
        for name, rate, chunk in chunks:
            phase_started = time.time()
            snapshot = cpu_snapshot(pids)
            print(f"{name}: producing {len(chunk):,} events at {rate:g}/s", flush=True)
            produced = produce_steadily(producer, chunk, rate)
            ids = [e.event_id for e in chunk]
            drain = args.warmup_drain_seconds if name == "warm-up" else args.drain_seconds
            drained_from = time.monotonic()
            covered = 0
            while time.monotonic() - drained_from < drain:
                for child, process in children.items():
                    if process.poll() is not None:
                        raise SystemExit(f"{child} exited with {process.returncode}; see {work / 'logs'}")
                covered = watch.covered(ids)
                if covered == len(ids):
                    break
                time.sleep(0.5)
            drained = time.monotonic() - drained_from
            print(f"{name}: produced in {produced[-1] - produced[0]:.1f} s; {covered:,}/{len(ids):,} served by "
                  f"{watch.served_version()} {drained:.1f} s after the last produce", flush=True)
            timeline[name] = (rate, ids, produced, (phase_started, time.time()))
            cpu[name] = cores_used(snapshot, cpu_snapshot(pids))
            print(f"{name}: cores used from the first produce to the last event served: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in cpu[name].items() if v is not None), flush=True)
        watch.stop.set()
        for thread in threads:
            thread.join(timeout=15)
    # the processes are stopped (the learner exported what it had, which no answer shows: not counted)
    logged_frame = read_event_log(store_dir)
    logged = dict(zip(logged_frame["event_id"], zip(positions(logged_frame), logged_frame["offset"].astype(int))))
    windows, exports = learn_windows(work / "logs" / "learn.log")
    written = np.sort([b["written"] for b in watch.batches.values()])
    for i, window in enumerate(windows[1:], start=1):
        # the step before it ended with new batch files on disk (written in its last second): this
        # window's step began right then; else idle steps (sleep, compaction of nothing) came between
        previous_end = windows[i - 1]["end"] + (windows[i - 1]["export_s"] or 0.0)
        if not ((written > previous_end - 1.0) & (written <= previous_end)).any():
            window["gap_s"] = None
    learned_at = window_of_each_batch(watch.batches, windows) if not watch.missed_batches else None
    window_ends: dict[str, float] = {}
    if learned_at is not None:
        by_batch: dict[float, list] = {}
        for event_id, (written, _, _) in watch.logged.items():
            by_batch.setdefault(written, []).append(event_id)
        for batch_name, end in learned_at.items():
            for event_id in by_batch.get(watch.batches[batch_name]["written"], []):
                window_ends[event_id] = end
    for name, (rate, ids, produced, span) in timeline.items():
        phases.append({**analyse_phase(name, rate, ids, produced, watch, logged, window_ends, span, windows),
                       "cores_used": cpu[name]})

    total = round(time.perf_counter() - started, 1)
    headline = [p for p in phases if p["phase"] != "warm-up"]
    goal = {f"{p['rate_per_s']:g}/s": (p["freshness_s"]["p50"] is not None
                                       and p["freshness_s"]["p50"] <= FRESHNESS_GOAL_P50_S) for p in headline}
    ingest_lines = [m for _, _, m in read_process_log(work / "logs" / "ingest.log") if m.startswith(("last", "stopped"))]
    report = {
        "benchmark": "freshness", "measured_at": now(), "machine": f"{machine()}, {os.cpu_count()} cores",
        "protocol": {
            "data": f"{schema.name}: the first {len(past):,} interactions by time in a local (SQLite) Feast store "
                    f"and a 1-epoch model trained from it ({config.sequence.mode}); the next {needed:,} streamed",
            "services": "embedded broker (tansu), plexrec ingest, plexrec learn, plexrec serve: one process each "
                        "on loopback; the bench produces and polls Score",
            "freshness": "per event: the first time a Score answer carried a model version whose manifest offsets "
                         "(metrics.continual.position.offsets) are at or past the event's logged (position, "
                         "offset), minus the event's produce time; events never covered count as infinite",
            "poll_ms": args.poll_ms, "seconds_per_rate": args.seconds, "warmup_events": args.warmup_events,
            "drain_seconds": args.drain_seconds, "settings": settings, "embedded_defaults": embedded_defaults,
            "stages": "logged: the ingester's batch file (named by its time); learned: the end of the learner "
                      "window that took it (its log line); exported: the first covering version visible under "
                      "models/; served: the first Score answer with a covering version"},
        "goal": {"p50_s_at_most": FRESHNESS_GOAL_P50_S, "met": goal},
        "setup_seconds": round(setup_seconds, 1), "seconds": total,
        "initial_model": {"test_auc": fit["test"]["auc"], "version": Path(fit["model_dir"]).name},
        "versions_exported": len(watch.versions) - 1, "exports": exports,
        "batches_seen": len(watch.batches), "batches_missed": len(watch.missed_batches),
        "ingest_log": ingest_lines, "phases": phases,
        "windows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in w.items() if k != "compaction"}
                    for w in windows],
    }
    write_json(args.freshness_out, report)

    print(f"\nevent -> served model freshness ({schema.name}, {'embedded defaults' if embedded_defaults else settings}; "
          f"goal p50 <= {FRESHNESS_GOAL_P50_S:g} s)\n")
    print("| rate | events | covered | p50 | p99 | max | produce -> logged (p50) | logged -> learned (p50) "
          "| learned -> exported (p50) | exported -> served (p50) | versions served | learner step (mean) "
          "| of which compaction / learning |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        f, b, w = p["freshness_s"], p["breakdown_s"], p["windows"]
        step = (f"{w['step_s']['mean']:.1f} s ({w['events']['mean']:.0f} events)" if w.get("step_s") else "—")
        split = (f"{w['compaction_s']['mean']:.1f} / {w['learn_s']['mean']:.1f} s" if w.get("compaction_s") else "—")
        print(f"| {p['phase']} ({p['achieved_rate_per_s']:.0f}/s achieved) | {p['events']:,} | {p['covered']:,} | "
              f"{_s(f['p50'])} | {_s(f['p99'])} | {_s(f['max'])} | {_s(b['produce_to_logged']['p50'])} | "
              f"{_s(b.get('logged_to_learned', {}).get('p50'))} | {_s(b.get('learned_to_exported', {}).get('p50'))} | "
              f"{_s(b['exported_to_served']['p50'])} | {p['versions_served']} | {step} | {split} |")
    for p in headline:
        met = goal[f"{p['rate_per_s']:g}/s"]
        print(f"\ngoal at {p['rate_per_s']:g}/s: p50 {_s(p['freshness_s']['p50'])} (<= {FRESHNESS_GOAL_P50_S:g} s): "
              f"{'met' if met else 'NOT met'}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


def _s(value) -> str:
    return "—" if value is None else f"{value:.1f} s"


def all_parts(args) -> None:
    quality(args)
    freshness(args)


PARTS = {"quality": quality, "freshness": freshness, "all": all_parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=list(PARTS), default="quality",
                        help="quality (prequential AUC), freshness (event -> served model), or all (both)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=10, help="windows the stream is cut into")
    parser.add_argument("--epochs", type=int, help="train.epochs of the initial fit (default: the config's)")
    parser.add_argument("--out", default="bench/results/freshness_quality.json")
    freshness_args = parser.add_argument_group("freshness")
    freshness_args.add_argument("--rates", default="100,1000", help="steady produce rates, events/s, one after another")
    freshness_args.add_argument("--seconds", type=float, default=60.0, help="how long each rate is produced")
    freshness_args.add_argument("--warmup-events", type=int, default=300,
                                help="produced at 100/s first, until served (the learner's first window builds it)")
    freshness_args.add_argument("--warmup-drain-seconds", type=float, default=150.0)
    freshness_args.add_argument("--drain-seconds", type=float, default=90.0,
                                help="after a rate's last produce, wait at most this long for every event to be served")
    freshness_args.add_argument("--poll-ms", type=float, default=150.0, help="Score calls to the server this often")
    freshness_args.add_argument("--export-seconds", type=float, help="plexrec learn --export-seconds (default: its own)")
    freshness_args.add_argument("--export-events", type=int, help="plexrec learn --export-events (default: its own)")
    freshness_args.add_argument("--learn-poll-seconds", type=float, help="plexrec learn --poll-seconds (default: its own)")
    freshness_args.add_argument("--reload-seconds", type=float, help="plexrec serve --reload-seconds (default: its own)")
    freshness_args.add_argument("--work-dir", help="keep the store, models and the services' logs here (emptied first; "
                                                   "default: a temporary directory, removed)")
    freshness_args.add_argument("--freshness-out", default="bench/results/freshness.json")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)
    PARTS[args.part](args)


if __name__ == "__main__":
    main()
