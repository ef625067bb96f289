"""Ranking quality: no collisions vs hashing trick vs unified embedding, on both splits.

    .venv/bin/python bench/quality.py [--config configs/ml100k.yaml] [--splits last_n time]
                                      [--seeds 3] [--epochs 8] [--small-budget 10000] [--out ...]
    .venv/bin/python bench/quality.py --config configs/kuairand.yaml --splits time --small-budget 0 \
                                      --epochs 4 --out bench/results/quality_kuairand.json

Every model has the same tower and the same features; only the embedding layer
differs. Budgets are embedding parameters: the no-collision model's own size
(one row per known value) and ``--small-budget`` (0: none), where hashed and
unified share the same budget. Splits: ``last_n`` (per user, the last 5 test and
5 before them validation) and ``time`` (one cut: the latest 10% of rows test, the
10% before validation; per-user last-n lets training rows be later than test
rows). Each run reports the test metrics of the epoch with the best validation
AUC, as the trainer selects and exports it (``Trainer.fit``). Mean and standard deviation
over seeds go to JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cell, machine, now, summarise, write_json

from recsys.logs import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.data.dataset import load_dataset  # noqa: E402
from recsys.train import Trainer  # noqa: E402

SPLITS = {"last_n": "per user: last 5 test, 5 before valid", "time": "one time cut: latest 10% test, 10% before valid"}


def run_one(config, examples, out_dir) -> dict:
    """The trainer's own selection: the best validation epoch, as ``plexrec train`` exports it."""
    trainer = Trainer(config, examples=examples, out_dir=out_dir)
    result = trainer.fit(progress=False)
    return {"embedding_parameters": trainer.embedding_parameters, "epoch": result["best_epoch"],
            "valid_auc": result["valid"]["valid_auc"], **{f"test_{k}": v for k, v in result["test"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--config", default="configs/ml100k.yaml")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--small-budget", type=int, default=10_000,
                        help="a second, smaller parameter budget for hashed and unified (0: none)")
    parser.add_argument("--patience", type=int, default=2, help="train.early_stopping_patience (0: every epoch)")
    parser.add_argument("--out", default="bench/results/quality.json")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)

    runs, started = [], time.perf_counter()
    for split in args.splits:
        common = {"train.epochs": args.epochs, "train.checkpoint_every_epoch": False, "data.split": split,
                  "train.early_stopping_patience": args.patience}
        base = load_config(args.config, common)
        examples, schema = load_dataset(base.data)
        full_size = Trainer(load_config(args.config, {**common, "embedding.kind": "full"}), examples=examples,
                            out_dir="/tmp/plexrec-bench").embedding_parameters
        dim = base.embedding.dim
        variants = [("full", full_size, None)]
        for budget in [full_size] + ([args.small_budget] if args.small_budget else []):
            variants += [("hashed", budget, budget // dim), ("unified", budget, budget // dim)]
        for kind, budget, rows in variants:
            for seed in range(args.seeds):
                overrides = {**common, "embedding.kind": kind, "train.seed": seed}
                if rows is not None:
                    overrides["embedding.num_rows"] = rows
                result = run_one(load_config(args.config, overrides), examples, "/tmp/plexrec-bench")
                runs.append({"split": split, "kind": kind, "budget": budget, "seed": seed, **result})
                print(f"{split:6s} {kind:8s} budget {budget:6d} seed {seed}: params {result['embedding_parameters']:6d} "
                      f"test AUC {result['test_auc']:.4f} GAUC {result['test_gauc']:.4f} "
                      f"logloss {result['test_logloss']:.4f} (best epoch {result['epoch']})", flush=True)

    summary = summarise(runs, ["split", "kind", "budget"], ["embedding_parameters", "test_auc", "test_gauc",
                                                            "test_logloss", "epoch"])
    write_json(args.out, {
        "benchmark": "quality", "dataset": schema.name, "config": args.config,
        "splits": {split: SPLITS[split] for split in args.splits},
        "measured_at": now(), "machine": machine(), "epochs": args.epochs, "patience": args.patience,
        "seconds": round(time.perf_counter() - started, 1), "summary": summary, "runs": runs,
    })
    print(f"\n{schema.name}\n\n| split | embedding | budget | parameters used | test AUC | test GAUC | test log loss "
          "| best epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        used = row["embedding_parameters"]["mean"]
        print(f"| {row['split']} | {row['kind']} | {row['budget']:,} | {used:,.0f} ({used / row['budget']:.0%}) | "
              f"{cell(row, 'test_auc')} | {cell(row, 'test_gauc')} | {cell(row, 'test_logloss')} | "
              f"{row['epoch']['mean']:.1f} |")


if __name__ == "__main__":
    main()
