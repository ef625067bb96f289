"""Ranking quality on MovieLens 100K: no collisions vs hashing trick vs unified embedding.

    .venv/bin/python bench/quality.py [--seeds 3] [--epochs 8] [--out bench/results/quality.json]

Every model has the same tower and the same features; only the embedding layer
differs. Budgets are embedding parameters: the no-collision model's own size
(one row per known value, ~43.7k) and ~10k, where hashed and unified share the
same budget. Each run reports the test metrics of the epoch with the best
validation AUC (early stopping on validation, chosen per run). Mean and
standard deviation over seeds go to JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.data.examples import load_dataset  # noqa: E402
from recsys.train import Trainer  # noqa: E402

SMALL_BUDGET = 10_000


def run_one(config, examples, out_dir) -> dict:
    trainer = Trainer(config, examples=examples, out_dir=out_dir)
    best = None
    for _ in range(config.train.epochs):
        trainer.train_epoch(progress=False)
        valid, test = trainer.evaluate("valid"), trainer.evaluate("test")
        if best is None or valid["auc"] > best["valid_auc"]:
            best = {"epoch": trainer.epoch, "valid_auc": valid["auc"], **{f"test_{k}": v for k, v in test.items()}}
    return {"embedding_parameters": trainer.embedding_parameters, **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--config", default="configs/ml100k.yaml")
    parser.add_argument("--out", default="bench/results/quality.json")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)

    base = load_config(args.config, {"train.epochs": args.epochs, "train.checkpoint_every_epoch": False})
    examples, _ = load_dataset(base.data)
    full_size = Trainer(load_config(args.config, {"embedding.kind": "full"}), examples=examples,
                        out_dir="/tmp/plexrec-bench").embedding_parameters
    dim = base.embedding.dim
    variants = [("full", full_size, None)]
    for budget in (full_size, SMALL_BUDGET):
        variants += [("hashed", budget, budget // dim), ("unified", budget, budget // dim)]

    runs, started = [], time.perf_counter()
    for kind, budget, rows in variants:
        for seed in range(args.seeds):
            overrides = {"embedding.kind": kind, "train.seed": seed, "train.epochs": args.epochs,
                         "train.checkpoint_every_epoch": False}
            if rows is not None:
                overrides["embedding.num_rows"] = rows
            result = run_one(load_config(args.config, overrides), examples, "/tmp/plexrec-bench")
            runs.append({"kind": kind, "budget": budget, "seed": seed, **result})
            print(f"{kind:8s} budget {budget:6d} seed {seed}: params {result['embedding_parameters']:6d} "
                  f"test AUC {result['test_auc']:.4f} GAUC {result['test_gauc']:.4f} "
                  f"logloss {result['test_logloss']:.4f} (best epoch {result['epoch']})", flush=True)

    summary = []
    for kind, budget, _ in variants:
        group = [r for r in runs if r["kind"] == kind and r["budget"] == budget]
        row = {"kind": kind, "budget": budget, "embedding_parameters": group[0]["embedding_parameters"],
               "seeds": len(group)}
        for metric in ("test_auc", "test_gauc", "test_logloss", "epoch"):
            values = np.array([r[metric] for r in group], dtype=float)
            row[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        summary.append(row)

    result = {
        "benchmark": "quality", "dataset": "MovieLens 100K", "split": "per user: last 5 test, 5 before valid",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "epochs": args.epochs, "seconds": round(time.perf_counter() - started, 1),
        "summary": summary, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| embedding | budget | parameters | test AUC | test GAUC | test log loss |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        def cell(metric):
            return f"{row[metric]['mean']:.4f} ± {row[metric]['std']:.4f}"
        print(f"| {row['kind']} | {row['budget']:,} | {row['embedding_parameters']:,} | {cell('test_auc')} | "
              f"{cell('test_gauc')} | {cell('test_logloss')} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
