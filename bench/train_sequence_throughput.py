"""Training throughput of the sequence modes, this code against an earlier commit, side by side.

    nice .venv/bin/python bench/train_sequence_throughput.py [--before-commit b63192e] [--lengths 200 1000]

The code before is checked out (once) as a git worktree in --before (default /tmp/before);
``--codes after`` measures this tree alone (no git needed). ``--device cuda`` runs on the GPU (the
default, cpu, hides any GPU).

For each code tree (before, after), sequence mode (none, mean, coupled, dare) and history length
L, one process builds the ranker of configs/synthetic_long.yaml (synthetic long histories; L caps
them, so at L = 1,000 they are 600-1,000 long, at L = 200 all 200) and times
``Trainer.train_step``: forward + backward + fbgemm's fused row-wise Adagrad under
DistributedModelParallel, batch 256, 1 thread, on prebuilt batches. examples/s is the median
over several timed windows; the whole interleaved sweep runs ``--rounds`` times and each
configuration reports its best round (the one a neighbour on the shared cores disturbed least;
every round is in the JSON). Results: JSON with the ratios dare/coupled and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "mean", "coupled", "dare")
WINDOWS = 5


def measure(code_root: str, mode: str, length: int, args: argparse.Namespace) -> dict:
    sys.path.insert(0, code_root)
    import numpy as np
    import torch

    import recsys
    if not Path(recsys.__file__).resolve().is_relative_to(Path(code_root).resolve()):
        raise RuntimeError(f"imported recsys from {recsys.__file__}, not from {code_root}")
    from recsys.config import load_config
    from recsys.data.batching import make_batch
    from recsys.known_warnings import torchrec_calls
    from recsys.train import Trainer

    torch.set_num_threads(1)
    config = load_config(ROOT / "configs/synthetic_long.yaml", {
        "sequence.mode": mode, "sequence.top_k": args.top_k, "data.max_history": length,
        "data.synthetic.num_users": args.users, "train.batch_size": args.batch_size})
    with torchrec_calls():
        trainer = Trainer(config, examples=None, out_dir="/tmp/plexrec-sequence-throughput")
        rng = np.random.default_rng(0)
        examples = trainer.train_examples
        if trainer.ctx.device.type != args.device:
            raise RuntimeError(f"the trainer chose {trainer.ctx.device}, not {args.device}")
        batches = [make_batch(examples, rng.choice(len(examples), args.batch_size, replace=False),
                              trainer.batch_features, trainer.history_length).to(args.device) for _ in range(8)]
        for i in range(args.warmup):
            trainer.train_step(batches[i % len(batches)])
        windows = []  # the median of several timed windows shrugs off a noisy neighbour
        for _ in range(WINDOWS):
            started = time.perf_counter()
            for i in range(args.steps):
                trainer.train_step(batches[i % len(batches)])
            windows.append(args.steps * args.batch_size / (time.perf_counter() - started))
    mean_history = float(np.mean([int(b.sparse["history_item_id"].lengths().sum()) for b in batches])) \
        / args.batch_size if mode != "none" else 0.0
    return {"mode": mode, "device": args.device, "max_history": length, "mean_history": mean_history,
            "top_k": args.top_k,
            "batch_size": args.batch_size, "steps_per_window": args.steps,
            "examples_per_s": float(np.median(windows)), "examples_per_s_windows": windows}


def run_one(code: str, code_root: str, mode: str, length: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", code_root, mode, str(length), "--top-k", str(args.top_k),
               "--users", str(args.users), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device]
    # the code tree first; a PYTHONPATH already set (packages installed outside the environment) after it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1",
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{code} {mode} L={length} failed:\n{out.stderr[-3000:]}")
    return {"code": code, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="/tmp/before", help="a worktree of the code to compare against "
                                                                 "(made from --before-commit if missing)")
    parser.add_argument("--before-commit", default="b63192e",
                        help="the commit before DARE's training lookups changed (issue 14)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--users", type=int, default=300, help="synthetic users (about 34 training examples each)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codes", nargs="+", default=["before", "after"], choices=["before", "after"],
                        help="which code trees to measure (after: this one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench/results/train_sequence_throughput.json")
    parser.add_argument("--one", nargs=3, metavar=("CODE_ROOT", "MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]), args)))
        return

    trees = {code: path for code, path in (("before", str(Path(args.before).resolve())), ("after", str(ROOT)))
             if code in args.codes}
    before_commit = None
    if "before" in trees:
        if not Path(trees["before"]).exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", trees["before"],
                            args.before_commit], check=True)
        if not (Path(trees["before"]) / "recsys").is_dir():
            raise SystemExit(f"{args.before} holds no recsys/: git worktree add {args.before} <commit>")
        before_commit = subprocess.run(["git", "-C", trees["before"], "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
    rounds: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for length in args.lengths:
            for mode in args.modes:
                for code in trees:  # interleaved, so drift hits both alike
                    r = run_one(code, trees[code], mode, length, args)
                    rounds.setdefault((code, mode, length), []).append(r)
                    print(f"round {round_ + 1} {code:6s} {mode:7s} L {length:>5}: "
                          f"{r['examples_per_s']:8,.0f} examples/s", flush=True)
    results = []
    for runs in rounds.values():
        best = max(runs, key=lambda r: r["examples_per_s"])
        results.append({**best, "examples_per_s_rounds": [r["examples_per_s"] for r in runs]})

    def speed(code, mode, length):
        return next(r["examples_per_s"] for r in results
                    if r["code"] == code and r["mode"] == mode and r["max_history"] == length)

    ratios = []
    for length in args.lengths:
        row = {"max_history": length}
        if len(trees) == 2:
            row["after_over_before"] = {m: speed("after", m, length) / speed("before", m, length) for m in args.modes}
        if {"dare", "coupled"} <= set(args.modes):
            row["dare_over_coupled"] = {c: speed(c, "dare", length) / speed(c, "coupled", length) for c in trees}
        ratios.append(row)
    import torch
    report = {"benchmark": "train_sequence_throughput",
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread, torch {torch.__version__}"
                         + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
              "device": args.device,
              "config": "configs/synthetic_long.yaml", "before_commit": before_commit,
              "trainer": "recsys.train.Trainer.train_step: DMP (1 rank), fused EXACT_ROWWISE_ADAGRAD, Adam tower",
              "examples_per_s": f"best of {args.rounds} rounds of the median of {WINDOWS} windows "
                                f"of {args.steps} steps",
              "results": results, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| L | mode | " + " | ".join(f"{c} examples/s" for c in trees)
          + (" | after / before |" if len(trees) == 2 else " |"))
    print("|---|---|" + "---|" * (len(trees) + (len(trees) == 2)))
    for length in args.lengths:
        for mode in args.modes:
            cells = [f"{speed(c, mode, length):,.0f}" for c in trees]
            if len(trees) == 2:
                cells.append(f"{speed('after', mode, length) / speed('before', mode, length):.2f}x")
            print(f"| {length:,} | {mode} | " + " | ".join(cells) + " |")
    for row in ratios:
        if "dare_over_coupled" in row:
            print(f"L {row['max_history']:,}: dare / coupled = "
                  + ", ".join(f"{row['dare_over_coupled'][c]:.2f} {c}" for c in trees))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
