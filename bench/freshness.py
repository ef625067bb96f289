"""Freshness: what learning from the stream is worth (and, as another part, how fast events reach the model).

    .venv/bin/python bench/freshness.py --part quality [--datasets ml100k kuairand] [--seeds 3]
                                        [--windows 10] [--epochs N] [--out bench/results/freshness_quality.json]

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
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, now, summarise, write_json

from recsys.cli import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.continual import ContinualLearner, time_windows  # noqa: E402
from recsys.data.examples import load_dataset  # noqa: E402
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


PARTS = {"quality": quality}  # the event -> served model latency part goes here too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=list(PARTS), default="quality")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=10, help="windows the stream is cut into")
    parser.add_argument("--epochs", type=int, help="train.epochs of the initial fit (default: the config's)")
    parser.add_argument("--out", default="bench/results/freshness_quality.json")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)
    PARTS[args.part](args)


if __name__ == "__main__":
    main()
