"""Why DARE loses to coupled attention (issue 22 item 2): what the attention space learns, per epoch.

    nice -n 10 .venv/bin/python bench/dare_diagnostics.py [--datasets synthetic ml100k_implicit]
        [--seeds 1] [--epochs 3] [--variants coupled dare dare-attnlr10 ...] [--users 400]

For every run (data set x variant x seed) and every epoch (0 = the initial weights):
  valid_auc / valid_gauc    the trainer's own evaluation
  attention_change          |W_e - W_{e-1}| / |W_{e-1}| of the attention table (coupled: its one table)
  representation_change     the same for the unified table (the representation R(x) of DARE)
  attention_norm            |W_e| of the attention table
  entropy                   mean softmax entropy over the kept top-k (nats), and / log(k'): 1 = uniform
  top_weight                mean largest softmax weight
  score_std                 mean std of the kept scores (the softmax's logits) per example
  topk_overlap              mean |K_e & K_{e-1}| / |K_e| of the kept behaviour positions (same valid examples)
  recent_share              share of the kept behaviours among each history's last 50
  recall (synthetic only)   mean share of an example's planted (relevant) behaviours that the top-k keeps;
                            recall_chance: k' / L, what a random pick would get

A variant is a sequence mode plus run-config overrides, and optionally a script-level intervention
that needs no code change in recsys/: ``attention_lr_scale`` multiplies the fused row-wise
Adagrad learning rate of the attention table only (TorchRec's per-table fused optimizer reads
param_groups[0]["lr"] at every step), ``attention_init_scale`` multiplies its initial weights.
The examples are a subsample of users (``--users``) so that a run takes a few minutes on CPU.
topk_overlap at epoch 1 compares with the search of the initial weights.

bench/results/dare_diagnostics.json (2026-12-04, 1 thread, a shared 2-core machine) was made by
(each in /tmp/dd, then ``--merge`` of the files):
    --datasets synthetic --users 600 --seeds 2 --epochs 3 --variants none coupled dare dare-attnlr0.1
        dare-attnlr10 dare-attnlr3 dare-attnlr30 coupled-attnlr10 dare-lr0.5 dare-da96-attnlr10
    --datasets ml100k_implicit --users 400 --seeds 2 --epochs 3 --variants none coupled dare
    --datasets ml100k_implicit --users 400 --seeds 1 --epochs 3 --variants dare-attnlr10 coupled-attnlr10

bench/results/dare_logit_scale.json (2026-12-04, same machine): the softmax's logit scale tau
(variants <mode>-tau<initial tau>[L: learned]), merged from
    --datasets synthetic --synthetic-length 200 --seeds 1 --epochs 3 --probe 2000 --variants dare
        dare-tau1L dare-tau16L coupled-d16 coupled-d16-tau1L coupled   (then dare-tau4L coupled-tau1L)
    --datasets synthetic --synthetic-length 200 --first-seed 1 --seeds 2 --epochs 3 --probe 2000
        --variants dare dare-tau1L dare-tau4L dare-tau16L
    --datasets ml100k_implicit --users 300 --seeds 1 --epochs 3 --variants dare coupled (then dare-tau1L
        dare-tau4L coupled-tau1L coupled-d16 coupled-d16-tau1L)
    --datasets ml100k_implicit --users 300 --first-seed 1 --seeds 2 --epochs 3 --variants dare dare-tau1L
        dare-tau4L
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from common import machine, now, subsample_users, write_json

from features.synthetic import relevant_positions  # noqa: E402
from recsys.logs import configure_logging  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.data.batching import HISTORY_ITEMS, iterate_batches  # noqa: E402
from recsys.data.dataset import load_dataset  # noqa: E402
from recsys.train import Trainer  # noqa: E402

DATASETS = {
    "synthetic": ("configs/synthetic_long.yaml", {}),
    # ML-100K as implicit feedback: every rating a positive, 2 popularity-sampled negatives each
    "ml100k_implicit": ("configs/ml100k_sequence.yaml", {"data.schema": "data/ml-100k/schema-implicit.yaml",
                                                         "data.split": "last_n"}),
    "kuairand": ("configs/kuairand.yaml", {}),
}
# name -> (mode, overrides, script-level interventions)
VARIANTS = {
    "none": ("none", {}, {}),
    "coupled": ("coupled", {}, {}),
    "dare": ("dare", {}, {}),
    "dare-attnlr3": ("dare", {}, {"attention_lr_scale": 3.0}),
    "dare-attnlr10": ("dare", {}, {"attention_lr_scale": 10.0}),
    "dare-attnlr30": ("dare", {}, {"attention_lr_scale": 30.0}),
    "coupled-attnlr10": ("coupled", {}, {"attention_lr_scale": 10.0}),  # the coupled table's lr (both roles)
    "dare-lr0.5": ("dare", {"train.embedding_lr": 0.5}, {}),  # every table x10: coupled-attnlr10's history tables
    "dare-da96-attnlr10": ("dare", {"sequence.attention_dim": 96}, {"attention_lr_scale": 10.0}),
    "dare-attnlr0.1": ("dare", {}, {"attention_lr_scale": 0.1}),
    "dare-init10": ("dare", {}, {"attention_init_scale": 10.0}),
    "dare-da64": ("dare", {"sequence.attention_dim": 64}, {}),
    "dare-k16": ("dare", {"sequence.top_k": 16}, {}),
    "dare-nopos": ("dare", {"sequence.position_buckets": 1}, {}),
    "coupled-nopos": ("coupled", {"sequence.position_buckets": 1}, {}),
    "dare-lr0.01": ("dare", {"train.embedding_lr": 0.01}, {}),
    "coupled-lr0.01": ("coupled", {"train.embedding_lr": 0.01}, {}),
    # the softmax's logit scale tau (sequence.logit_scale, learned with sequence.learn_logit_scale)
    **{f"{mode}-tau{tau:g}{'L' if learn else ''}": (mode, {"sequence.logit_scale": float(tau),
                                                           "sequence.learn_logit_scale": learn}, {})
       for mode in ("dare", "coupled") for tau in (1, 4, 8, 16, 32, 64) for learn in (True, False)},
    "coupled-d16": ("coupled", {"sequence.coupled_dim": 16}, {}),
    "coupled-d16-tau1L": ("coupled", {"sequence.coupled_dim": 16, "sequence.learn_logit_scale": True}, {}),
}
RECENT = 50


def table_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A copy of every embedding table's weight, by table name (attention / coupled / unified)."""
    out = {}
    for key, value in trainer.model.state_dict().items():
        if "embedding_bags" not in key or not key.endswith(".weight"):
            continue
        tensor = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
        out[key.split(".")[-2]] = tensor.detach().clone().float()
    return out


def fused_optimizers(trainer: Trainer) -> list[tuple[str, object]]:
    """(parameter names, optimizer) of every per-table fused optimizer, however deeply combined."""
    found = []

    def walk(opt, prefix=""):
        if hasattr(opt, "optimizers"):
            for name, inner in opt.optimizers:
                walk(inner, f"{prefix}{name}.")
        else:
            names = list(getattr(opt, "params", {}).keys()) if hasattr(opt, "params") else []
            found.append((prefix + ",".join(names), opt))
    walk(trainer.model.fused_optimizer)
    return found


def intervene(trainer: Trainer, table: str, lr_scale: float | None, init_scale: float | None) -> list[str]:
    touched = []
    if lr_scale:
        for names, opt in fused_optimizers(trainer):
            if f".{table}." in names or names.endswith(f"{table}.weight") or f"{table}.weight" in names:
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * lr_scale
                touched.append(names)
        if not touched:
            raise RuntimeError(f"no fused optimizer for table {table}: {[n for n, _ in fused_optimizers(trainer)]}")
    if init_scale:
        for key, value in trainer.model.state_dict().items():
            if key.endswith(f"embedding_bags.{table}.weight"):
                tensor = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
                with torch.no_grad():
                    tensor.mul_(init_scale)
                touched.append(key)
    return touched


@torch.no_grad()
def search_stats(trainer: Trainer, examples, synthetic: bool) -> tuple[dict, list[np.ndarray]]:
    """Entropy, top weight, score spread, recall of the planted behaviours; the kept positions per example."""
    ranker = trainer.model.module
    ranker.eval()
    entropy, norm_entropy, top_weight, score_std, recent, recalls, chance, kept_sets = [], [], [], [], [], [], [], []
    offset = 0
    for batch in iterate_batches(examples, trainer.batch_features, 512, shuffle=False,
                                 history_length=trainer.history_length):
        sparse = batch.to(trainer.ctx.device).sparse
        search = ranker.sequence.search(sparse)
        lengths = sparse.to_dict()[HISTORY_ITEMS].lengths().cpu().numpy()
        weights, valid, index = search.weights.cpu(), search.valid.cpu(), search.index.cpu()
        scores = (torch.einsum("bkd,bd->bk", search.picked, search.target).cpu() / math.sqrt(search.target.shape[1])
                  * float(ranker.sequence.logit_scale()))  # the softmax's logits
        for row in range(len(batch)):
            ok = valid[row]
            kept = index[row][ok].numpy()
            kept_sets.append(kept)
            n = int(ok.sum())
            if n >= 2:
                w = weights[row][ok].double().clamp_min(1e-30)
                h = float(-(w * w.log()).sum())
                entropy.append(h)
                norm_entropy.append(h / math.log(n))
                top_weight.append(float(w.max()))
                score_std.append(float(scores[row][ok].std()))
                recent.append(float((kept >= lengths[row] - RECENT).mean()))
            if synthetic:
                relevant = relevant_positions(examples, offset + row, trainer.history_length)
                if len(relevant):
                    recalls.append(float(np.isin(relevant, kept).mean()))
                    chance.append(n / max(int(lengths[row]), 1))
        offset += len(batch)
    stats = {"logit_scale": float(ranker.sequence.logit_scale()), "entropy": float(np.mean(entropy)), "entropy_normalised": float(np.mean(norm_entropy)),
             "top_weight": float(np.mean(top_weight)), "score_std": float(np.mean(score_std)),
             "recent_share": float(np.mean(recent))}
    if synthetic:
        stats["recall"] = float(np.mean(recalls))
        stats["recall_chance"] = float(np.mean(chance))
    return stats, kept_sets


def overlap(now_sets: list[np.ndarray], before: list[np.ndarray]) -> float:
    shares = [len(np.intersect1d(a, b)) / len(a) for a, b in zip(now_sets, before) if len(a)]
    return float(np.mean(shares)) if shares else float("nan")


def rel_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm().clamp_min(1e-30))


def run_one(dataset: str, variant: str, seed: int, epochs: int, examples, probe_examples: int) -> dict:
    path, base = DATASETS[dataset]
    mode, overrides, script = VARIANTS[variant]
    config = load_config(path, {**base, **overrides, "sequence.mode": mode, "train.seed": seed,
                                "train.epochs": epochs, "train.checkpoint_every_epoch": False})
    trainer = Trainer(config, examples=examples, out_dir=f"/tmp/plexrec-dare-diag/{dataset}-{variant}-{seed}")
    attention_table = {"dare": "attention", "coupled": "coupled"}.get(mode)
    touched = intervene(trainer, attention_table, script.get("attention_lr_scale"),
                        script.get("attention_init_scale")) if script else []
    valid = trainer.eval_examples["valid"]
    probe = valid.subset(np.arange(min(probe_examples, len(valid))))
    synthetic = dataset == "synthetic"
    record = {"dataset": dataset, "variant": variant, "mode": mode, "seed": seed, "overrides": overrides,
              "script": script, "touched": touched, "embedding_parameters": trainer.embedding_parameters,
              "train_examples": len(trainer.train_examples), "valid_examples": len(valid), "epochs": []}
    weights = table_weights(trainer)
    kept = None
    metrics = trainer.evaluate("valid")
    row = {"epoch": 0, "valid_auc": metrics["auc"], "valid_gauc": metrics["gauc"], "valid_logloss": metrics["logloss"]}
    if attention_table:
        row["attention_norm"] = float(weights[attention_table].norm())
        stats, kept = search_stats(trainer, probe, synthetic)
        row.update(stats)
    record["epochs"].append(row)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        loss = trainer.train_epoch(progress=False)
        seconds = time.perf_counter() - started
        metrics = trainer.evaluate("valid")
        new = table_weights(trainer)
        row = {"epoch": epoch, "train_loss": loss, "valid_auc": metrics["auc"], "valid_gauc": metrics["gauc"],
               "valid_logloss": metrics["logloss"], "seconds": round(seconds, 1),
               "representation_change": rel_change(new["unified"], weights["unified"])}
        if attention_table:
            row["attention_change"] = rel_change(new[attention_table], weights[attention_table])
            row["attention_norm"] = float(new[attention_table].norm())
            stats, kept_now = search_stats(trainer, probe, synthetic)
            row.update(stats)
            row["topk_overlap"] = overlap(kept_now, kept)
            kept = kept_now
        weights = new
        record["epochs"].append(row)
        print(f"{dataset:15s} {variant:15s} seed {seed} epoch {epoch}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "epoch"),
            flush=True)
    best = max(record["epochs"][1:], key=lambda r: r["valid_auc"])
    record["best_epoch"], record["best_valid_auc"] = best["epoch"], best["valid_auc"]
    return record


SUMMARY_KEYS = ["valid_auc", "valid_gauc", "valid_logloss", "train_loss", "attention_change", "representation_change",
                "logit_scale",
                "attention_norm", "entropy_normalised", "top_weight", "score_std", "topk_overlap", "recent_share", "recall",
                "recall_chance", "seconds"]


def summarise(runs: list[dict]) -> list[dict]:
    """Per (data set, variant, epoch): the mean over seeds of every per-epoch number (and the seeds' spread of AUC)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["variant"], run.get("max_history")), []).append(run)
    rows = []
    for (dataset, variant, max_history), group in groups.items():
        for epoch in range(len(group[0]["epochs"])):
            row = {"dataset": dataset, "variant": variant, "max_history": max_history, "epoch": epoch,
                   "seeds": len(group)}
            for key in SUMMARY_KEYS:
                values = [r["epochs"][epoch][key] for r in group if epoch < len(r["epochs"]) and key in r["epochs"][epoch]]
                if values:
                    row[key] = round(float(np.mean(values)), 5)
            aucs = [r["epochs"][epoch]["valid_auc"] for r in group if epoch < len(r["epochs"])]
            row["valid_auc_std"] = round(float(np.std(aucs, ddof=1)), 5) if len(aucs) > 1 else 0.0
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "ml100k_implicit"], choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=["coupled", "dare", "dare-attnlr10"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--users", type=int, default=400, help="users kept per data set (0: all)")
    parser.add_argument("--max-history", type=int, default=0, help="override data.max_history (0: the config's)")
    parser.add_argument("--synthetic-length", type=int, default=0,
                        help="size the synthetic generator to histories of this length (quality_sequence.py)")
    parser.add_argument("--probe", type=int, default=1000, help="valid examples the search statistics read")
    parser.add_argument("--out", default="bench/results/dare_diagnostics.json")
    parser.add_argument("--append", action="store_true", help="add to the runs already in --out")
    parser.add_argument("--merge", nargs="+", help="only combine these result files' runs into --out (no training)")
    args = parser.parse_args()
    if args.merge:
        import json
        from pathlib import Path
        runs = [run for path in args.merge for run in json.loads(Path(path).read_text())["runs"]]
        write_json(args.out, {"benchmark": "dare_diagnostics", "measured_at": now(), "machine": machine(),
                              "merged_from": args.merge, "summary": summarise(runs), "runs": runs})
        return
    configure_logging()
    torch.set_num_threads(1)
    import json
    from pathlib import Path
    runs = json.loads(Path(args.out).read_text())["runs"] if args.append and Path(args.out).exists() else []
    started = time.perf_counter()
    for dataset in args.datasets:
        path, base = DATASETS[dataset]
        if args.max_history:
            DATASETS[dataset] = (path, {**base, "data.max_history": args.max_history})
            base = DATASETS[dataset][1]
        if dataset == "synthetic" and args.synthetic_length:
            from quality_sequence import synthetic_generator
            base = {**base, **synthetic_generator(args.synthetic_length),
                    "data.max_history": args.synthetic_length}
            DATASETS[dataset] = (path, base)
            examples, _ = load_dataset(load_config(path, base).data)
        elif dataset == "synthetic" and args.users:
            base = {**base, "data.synthetic.num_users": args.users}
            DATASETS[dataset] = (path, base)
            examples, _ = load_dataset(load_config(path, base).data)
        else:
            examples = subsample_users(load_dataset(load_config(path, base).data)[0], args.users)
        for variant in args.variants:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                record = run_one(dataset, variant, seed, args.epochs, examples, args.probe)
                record["max_history"] = load_config(path, base).data.max_history
                record["users"] = args.users
                runs.append(record)
                write_json(args.out, {"benchmark": "dare_diagnostics", "measured_at": now(), "machine": machine(),
                                      "seconds_this_call": round(time.perf_counter() - started, 1),
                                      "summary": summarise(runs), "runs": runs})


if __name__ == "__main__":
    main()
