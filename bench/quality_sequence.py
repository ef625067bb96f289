"""Sequence models side by side: none / mean / coupled / DARE, per data set and history length.

    nice -n 10 .venv/bin/python bench/quality_sequence.py [--seeds 3] [--epochs 3]
        [--datasets synthetic ml100k_implicit kuairand] [--histories 50 200]
        [--variants none mean coupled dare] [--users 0] [--equal-params] [--set key=value ...]

synthetic        configs/synthetic_long.yaml: clicks that depend on a few planted behaviours
                 older than the most recent ones (features/synthetic.py). With --histories the
                 generator is sized to the length L (``synthetic_generator``): histories of
                 0.75 L - L behaviours with the plants inside them, so that every L has something
                 to find (cut to its last L, the 1,000-long default would hold few or no plants).
ml100k           configs/ml100k_sequence.yaml (explicit ratings, label rating >= 4), --splits
ml100k_implicit  the same, every rating a positive with 2 popularity-sampled negatives
                 (data/ml-100k/schema-implicit.yaml), each user's last ratings held out
kuairand         configs/kuairand.yaml: KuaiRand-Pure clicks, one cut in time

--equal-params gives every mode DARE's embedding parameters: coupled's one table is the shape
of DARE's attention table (attention_rows x attention_dim), none and mean get those parameters
as extra rows of the unified table (variant coupled-wide keeps coupled's default width). --users
keeps that many users drawn at random (0: all). --set applies run-config overrides to every run
(e.g. sequence.learn_logit_scale=true; variant dare-fixed then keeps tau fixed). --merge combines
result files and prints the table. docs/benchmarks.md lists the calls behind
bench/results/dare_quality_sequence.json.

Each run reports the test metrics of its best validation epoch, as the trainer selects and
exports it (``Trainer.fit``). On the synthetic data it also reports the search quality of
coupled and DARE: the share of the planted relevant behaviours that the search puts in its
top k (mean over test examples that have any).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import yaml
from common import cell, machine, now, subsample_users, summarise, write_json

from recsys.logs import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.data.batching import iterate_batches  # noqa: E402
from recsys.data.dataset import load_dataset  # noqa: E402
from features.synthetic import relevant_positions  # noqa: E402
from recsys.train import Trainer  # noqa: E402

DATASETS = {
    "synthetic": ("configs/synthetic_long.yaml", {}),
    "ml100k": ("configs/ml100k_sequence.yaml", {}),
    "ml100k_implicit": ("configs/ml100k_sequence.yaml", {"data.schema": "data/ml-100k/schema-implicit.yaml",
                                                         "data.split": "last_n"}),
    "kuairand": ("configs/kuairand.yaml", {}),
}
VARIANTS = {"none": {}, "mean": {}, "coupled": {}, "dare": {},
            "coupled-wide": {},  # coupled at its own default width even with --equal-params
            "dare-fixed": {"sequence.learn_logit_scale": False},  # tau fixed at sequence.logit_scale
            "dare-16": {"sequence.attention_dim": 16}, "dare-32": {"sequence.attention_dim": 32},
            "dare-64": {"sequence.attention_dim": 64}}


def synthetic_generator(length: int) -> dict:
    """Generator settings whose histories fit in ``length`` (50 or more) with plants inside them."""
    targets = max(10, length // 16)
    relevant_max = max(3, min(10, length // 20))
    recent = max(4, length // 10)
    low = recent + relevant_max * targets + 1
    users = 48_000 // targets
    return {"data.synthetic.min_history": max(low, int(0.75 * length)),
            "data.synthetic.max_history": length - targets, "data.synthetic.targets_per_user": targets,
            "data.synthetic.eval_targets": max(2, targets // 6),  # GAUC needs two a user
            "data.synthetic.relevant_min": 1 if relevant_max < 10 else 3,
            "data.synthetic.relevant_max": relevant_max, "data.synthetic.recent_window": recent,
            "data.synthetic.num_users": users}


def equal_parameters(mode: str, config) -> dict:
    """Overrides that give ``mode`` the embedding parameters of DARE under ``config``."""
    seq, emb = config.sequence, config.embedding
    attention = seq.attention_rows * seq.attention_dim
    if mode == "coupled":
        return {"sequence.coupled_dim": seq.attention_dim}
    if mode in ("none", "mean"):
        return {"embedding.num_rows": emb.num_rows + attention // emb.dim}
    return {}


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
    return float(np.mean(recalls)) if recalls else float("nan")


def run_one(config, examples, measure_search: bool) -> dict:
    """The trainer's own selection: the best validation epoch, evaluated (and searched) as kept."""
    trainer = Trainer(config, examples=examples, out_dir="/tmp/plexrec-bench-sequence")
    started = time.perf_counter()
    result = trainer.fit(progress=False)
    best = {"epoch": result["best_epoch"], "valid_auc": result["valid"]["valid_auc"],
            **{f"test_{k}": v for k, v in result["test"].items()}}
    if measure_search:
        best["search_recall"] = search_recall(trainer)  # the trainer holds the best epoch's weights
    if trainer.model.module.sequence is not None and trainer.model.module.sequence.space is not None:
        best["logit_scale"] = float(trainer.model.module.sequence.logit_scale())
    return {"embedding_parameters": trainer.embedding_parameters,
            "seconds_per_epoch": (time.perf_counter() - started) / result["epochs"], **best}


def parse_value(text: str):
    return yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "ml100k_implicit", "kuairand"],
                        choices=list(DATASETS))
    parser.add_argument("--histories", nargs="+", type=int, default=[0],
                        help="data.max_history values (0: the config's own)")
    parser.add_argument("--variants", nargs="+", default=["none", "mean", "coupled", "dare"], choices=list(VARIANTS))
    parser.add_argument("--splits", nargs="+", default=["last_n"], choices=["last_n", "time"],
                        help="splits for ml100k (the others declare their own)")
    parser.add_argument("--users", type=int, default=0, help="users kept per real data set (0: all)")
    parser.add_argument("--equal-params", action="store_true", help="every mode at DARE's embedding parameters")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides for all")
    parser.add_argument("--out", default="bench/results/quality_sequence.json")
    parser.add_argument("--merge", nargs="+", help="only combine these result files' runs into --out (no training)")
    args = parser.parse_args()
    if args.merge:
        import json
        from pathlib import Path
        reports = [json.loads(Path(path).read_text()) for path in args.merge]
        runs = [run for report in reports for run in report["runs"]]
        write_json(args.out, {"benchmark": "quality_sequence", "measured_at": now(), "machine": machine(),
                              "merged_from": [{"path": path, "users": r.get("users"), "epochs": r.get("epochs"),
                                               "equal_params": r.get("equal_params"),
                                               "common_overrides": r.get("common_overrides")}
                                              for path, r in zip(args.merge, reports)],
                              "summary": summarise_runs(runs), "runs": runs})
        print_table(summarise_runs(runs))
        return
    configure_logging()
    torch.set_num_threads(1)
    common = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}

    runs, started = [], time.perf_counter()
    plan = [(dataset, split, length) for dataset in args.datasets
            for split in (args.splits if dataset == "ml100k" else ["own"]) for length in args.histories]
    for dataset, split, length in plan:
        path, base = DATASETS[dataset]
        base = {**base, **common, **({"data.split": split} if split != "own" else {})}
        if length:
            base["data.max_history"] = length
            if dataset == "synthetic":
                base.update(synthetic_generator(length))
        examples, _ = load_dataset(load_config(path, base).data)
        if dataset != "synthetic":
            examples = subsample_users(examples, args.users)
        for variant in args.variants:
            mode = variant.split("-")[0]
            for seed in range(args.seeds):
                overrides = {**base, **VARIANTS[variant], "sequence.mode": mode, "train.seed": seed,
                             "train.epochs": args.epochs, "train.checkpoint_every_epoch": False}
                if args.equal_params and variant != "coupled-wide":
                    overrides.update(equal_parameters(mode, load_config(path, overrides)))
                config = load_config(path, overrides)
                result = run_one(config, examples, measure_search=dataset == "synthetic" and mode in ("coupled", "dare"))
                runs.append({"dataset": dataset, "split": split, "max_history": config.data.max_history,
                             "variant": variant, "seed": seed, "users": len(np.unique(examples.user_id)),
                             "overrides": {k: v for k, v in overrides.items() if k not in ("train.seed",)}, **result})
                recall = f", search recall {result['search_recall']:.3f}" if "search_recall" in result else ""
                print(f"{dataset:15s} {split:6s} L {config.data.max_history:4d} {variant:8s} seed {seed}: "
                      f"test AUC {result['test_auc']:.4f} GAUC {result['test_gauc']:.4f} "
                      f"logloss {result['test_logloss']:.4f}{recall} (best epoch {result['epoch']}, "
                      f"{result['seconds_per_epoch']:.0f} s/epoch, {result['embedding_parameters']} emb params)",
                      flush=True)
                summary = summarise_runs(runs)
                write_json(args.out, {"benchmark": "quality_sequence", "measured_at": now(), "machine": machine(),
                                      "epochs": args.epochs, "equal_params": args.equal_params, "users": args.users,
                                      "common_overrides": common, "seconds": round(time.perf_counter() - started, 1),
                                      "summary": summary, "runs": runs})

    print_table(summary)


def summarise_runs(runs: list[dict]) -> list[dict]:
    return summarise(runs, ["dataset", "split", "max_history", "users", "variant"],
                     ["test_auc", "test_gauc", "test_logloss", "search_recall", "logit_scale", "epoch",
                      "seconds_per_epoch", "embedding_parameters"])


def print_table(summary: list[dict]) -> None:
    """The Markdown table, then DARE's margins over coupled and none per (data, L, users)."""
    print("\n| data | users | L | model | test AUC | test GAUC | search recall@k | tau | best epoch | emb. params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in summary:
        tau = f"{row['logit_scale']['mean']:.2f}" if "logit_scale" in row else "—"
        print(f"| {row['dataset']}{'' if row['split'] == 'own' else ' ' + row['split']} | {row['users']} | "
              f"{row['max_history']} | {row['variant']} | {cell(row, 'test_auc')} | {cell(row, 'test_gauc')} | "
              f"{cell(row, 'search_recall')} | {tau} | {row['epoch']['mean']:.1f} | "
              f"{row['embedding_parameters']['mean']:,.0f} |")
    groups: dict[tuple, dict] = {}
    for row in summary:
        groups.setdefault((row["dataset"], row["split"], row["users"], row["max_history"]), {})[row["variant"]] = row
    print("\n| data | users | L | DARE - coupled (AUC) | DARE - none (AUC) | DARE - coupled-wide (AUC) |")
    print("|---|---|---|---|---|---|")
    for (dataset, _, users, length), rows in groups.items():
        if "dare" not in rows:
            continue
        dare = rows["dare"]["test_auc"]["mean"]
        diff = {v: f"{dare - rows[v]['test_auc']['mean']:+.4f}" if v in rows else "—"
                for v in ("coupled", "none", "coupled-wide")}
        print(f"| {dataset} | {users} | {length} | {diff['coupled']} | {diff['none']} | {diff['coupled-wide']} |")


if __name__ == "__main__":
    main()
