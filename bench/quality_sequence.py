"""Sequence models side by side: none / mean / coupled / DARE (attention dim 16, 32, 64).

    .venv/bin/python bench/quality_sequence.py [--seeds 3] [--epochs 3] [--datasets synthetic ml100k]
                                               [--splits last_n time]

synthetic  configs/synthetic_long.yaml: histories of up to 1,000 behaviours, clicks that
           depend on a few planted behaviours far back (features/synthetic.py)
ml100k     configs/ml100k_sequence.yaml: up to 200 earlier ratings as the history

Each run reports the test metrics of its best validation epoch, as the trainer selects
and exports it (``Trainer.fit``). On the synthetic
data it also reports the search quality of coupled and DARE: the share of the
planted relevant behaviours that the search puts in its top k (mean over test
examples that have any), the paper's explanation of why DARE wins.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import cell, machine, now, summarise, write_json

from recsys.logs import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.data.batching import iterate_batches  # noqa: E402
from recsys.data.dataset import load_dataset  # noqa: E402
from features.synthetic import relevant_positions  # noqa: E402
from recsys.train import Trainer  # noqa: E402

CONFIGS = {"synthetic": "configs/synthetic_long.yaml", "ml100k": "configs/ml100k_sequence.yaml"}
VARIANTS = [("none", None), ("mean", None), ("coupled", None), ("dare", 16), ("dare", 32), ("dare", 64)]


@torch.no_grad()
def search_recall(trainer: Trainer) -> float:
    """Mean share of each test example's planted behaviours that the search keeps."""
    test = trainer.eval_examples["test"]
    ranker = trainer.model.module
    recalls, offset = [], 0
    for batch in iterate_batches(test, trainer.batch_features, 512, shuffle=False,
                                 history_length=trainer.history_length):
        search = ranker.sequence.search(batch.to(trainer.ctx.device).sparse)
        for row in range(len(batch)):
            relevant = relevant_positions(test, offset + row, trainer.history_length)
            if len(relevant):
                kept = search.index[row][search.valid[row]].cpu().numpy()
                recalls.append(np.isin(relevant, kept).mean())
        offset += len(batch)
    return float(np.mean(recalls))


def run_one(config, examples, measure_search: bool) -> dict:
    """The trainer's own selection: the best validation epoch, evaluated (and searched) as kept."""
    trainer = Trainer(config, examples=examples, out_dir="/tmp/plexrec-bench-sequence")
    started = time.perf_counter()
    result = trainer.fit(progress=False)
    best = {"epoch": result["best_epoch"], "valid_auc": result["valid"]["valid_auc"],
            **{f"test_{k}": v for k, v in result["test"].items()}}
    if measure_search:
        best["search_recall"] = search_recall(trainer)  # the trainer holds the best epoch's weights
    return {"embedding_parameters": trainer.embedding_parameters,
            "seconds_per_epoch": (time.perf_counter() - started) / result["epochs"], **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--splits", nargs="+", default=["last_n", "time"], choices=["last_n", "time"],
                        help="splits for ml100k (synthetic data declares its own split column)")
    parser.add_argument("--out", default="bench/results/quality_sequence.json")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)

    runs, started = [], time.perf_counter()
    plan = [(dataset, split) for dataset in args.datasets
            for split in (["column"] if dataset == "synthetic" else args.splits)]
    for dataset, split in plan:
        split_override = {} if split == "column" else {"data.split": split}
        base = load_config(CONFIGS[dataset], split_override)
        examples, _ = load_dataset(base.data)
        for mode, attention_dim in VARIANTS:
            variant = f"dare-{attention_dim}" if attention_dim else mode
            for seed in range(args.seeds):
                overrides = {**split_override, "sequence.mode": mode, "train.seed": seed,
                             "train.epochs": args.epochs, "train.checkpoint_every_epoch": False}
                if attention_dim:
                    overrides["sequence.attention_dim"] = attention_dim
                config = load_config(CONFIGS[dataset], overrides)
                result = run_one(config, examples, measure_search=dataset == "synthetic" and mode in ("coupled", "dare"))
                runs.append({"dataset": dataset, "split": split, "variant": variant, "seed": seed, **result})
                recall = f", search recall {result['search_recall']:.3f}" if "search_recall" in result else ""
                print(f"{dataset:9s} {split:6s} {variant:8s} seed {seed}: test AUC {result['test_auc']:.4f} "
                      f"GAUC {result['test_gauc']:.4f} logloss {result['test_logloss']:.4f}{recall} "
                      f"(best epoch {result['epoch']}, {result['seconds_per_epoch']:.0f} s/epoch)", flush=True)

    summary = summarise(runs, ["dataset", "split", "variant"], ["test_auc", "test_gauc", "test_logloss", "search_recall",
                                                       "seconds_per_epoch", "embedding_parameters"])
    write_json(args.out, {"benchmark": "quality_sequence", "measured_at": now(), "machine": machine(),
                          "epochs": args.epochs, "seconds": round(time.perf_counter() - started, 1),
                          "summary": summary, "runs": runs})
    print("\n| data | split | model | test AUC | test GAUC | test log loss | search recall@k | s/epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['dataset']} | {row['split']} | {row['variant']} | {cell(row, 'test_auc')} | {cell(row, 'test_gauc')} | "
              f"{cell(row, 'test_logloss')} | {cell(row, 'search_recall')} | "
              f"{row['seconds_per_epoch']['mean']:.0f} |")


if __name__ == "__main__":
    main()
