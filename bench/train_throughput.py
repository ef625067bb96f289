"""Training throughput: the TorchRec model vs the same model on plain nn.EmbeddingBag.

    .venv/bin/python bench/train_throughput.py [--rows 100000 1000000 10000000] [--batch-size 4096] [--device cuda]

Both variants are the ranker of configs/ml100k.yaml on real MovieLens batches,
with the same hash, the same unified table and the same tower:
  torchrec  DistributedModelParallel (1 rank), fbgemm's fused row-wise Adagrad on the table
            (EXACT_ROWWISE_ADAGRAD, applied inside the backward pass)
  plain     one nn.EmbeddingBag(mode="mean", sparse=True) and the same row-wise Adagrad
            (one accumulator per row, the same lr and eps) written in PyTorch on its sparse
            gradient: bench/rowwise_adagrad.py, checked against fbgemm's kernel by
            tests/test_rowwise_adagrad.py
Both use Adam for the tower, so the ratio measures fbgemm's kernel and TorchRec, not the
optimizer. Each (variant, table rows) runs in its own process so resident memory is its
own; examples/s counts forward + backward + update (batches are prebuilt, on the device). Results:
JSON with ratios torchrec/plain per table size. ``--device cuda`` runs both variants on the GPU (the
default, cpu, hides any GPU, so a CPU run is a CPU run on any machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


WINDOWS = 5


def resident_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(variant: str, rows: int, batch_size: int, steps: int, warmup: int, device: str = "cpu") -> dict:
    import numpy as np
    import torch
    from torch import nn

    from recsys.logs import configure_logging
    from recsys.config import load_config
    from recsys.data.batching import make_batch
    from features.examples import TRAIN
    from recsys.data.dataset import load_dataset
    from recsys.embeddings import UnifiedEmbedding
    from recsys.model import Ranker

    from bench.rowwise_adagrad import TRAINER_EPS, RowWiseAdagrad

    configure_logging()
    torch.set_num_threads(1)
    config = load_config(ROOT / "configs/ml100k.yaml", {"embedding.num_rows": rows})
    examples, _ = load_dataset(config.data)
    train = examples.split_part(TRAIN)
    names = [f.name for f in config.features]
    rng = np.random.default_rng(0)
    batches = [make_batch(train, rng.choice(len(train), batch_size, replace=False), names).to(device)
               for _ in range(8)]
    loss_fn = nn.BCEWithLogitsLoss()
    memory_before = resident_mib()

    if variant == "torchrec":
        from recsys.train import Trainer
        trainer = Trainer(config, examples=examples, out_dir="/tmp/plexrec-throughput")
        if trainer.ctx.device.type != device:
            raise RuntimeError(f"the trainer chose {trainer.ctx.device}, not {device}")
        step = trainer.train_step
    else:
        hashing = UnifiedEmbedding(config.features, rows, config.embedding.dim, device="meta")

        class PlainUnifiedEmbedding(nn.Module):
            """The unified lookup on one nn.EmbeddingBag: same hash, same rows, same output."""

            def __init__(self):
                super().__init__()
                self.output_dim = hashing.output_dim
                self.bag = nn.EmbeddingBag(rows, config.embedding.dim, mode="mean", sparse=True)

            def forward(self, sparse):
                lookups = hashing.lookup_kjt(sparse)
                pooled = self.bag(lookups.values(), lookups.offsets()[:-1])  # [keys * B, d], key-major
                keys, batch = len(lookups.keys()), lookups.stride()
                return pooled.view(keys, batch, -1).transpose(0, 1).reshape(batch, -1)

        torch.manual_seed(0)
        model = Ranker(PlainUnifiedEmbedding(), len(examples.dense_names), config.model.mlp).to(device)
        sparse_opt = RowWiseAdagrad(model.embedding.parameters(), lr=config.train.embedding_lr, eps=TRAINER_EPS)
        dense_params = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
        dense_opt = torch.optim.Adam(dense_params, lr=config.train.dense_lr)

        def step(batch):
            loss = loss_fn(model(batch.dense, batch.sparse), batch.labels)
            sparse_opt.zero_grad(), dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step(), dense_opt.step()
            return float(loss)

    for i in range(warmup):
        step(batches[i % len(batches)])
    windows = []  # the median of several timed windows shrugs off a noisy neighbour
    for _ in range(WINDOWS):
        started = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        windows.append(steps * batch_size / (time.perf_counter() - started))
    return {"variant": variant, "device": device, "rows": rows, "batch_size": batch_size, "steps_per_window": steps,
            "examples_per_s": float(np.median(windows)), "examples_per_s_windows": windows,
            "model_memory_mib": resident_mib() - memory_before, "resident_mib": resident_mib(),
            **({"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20} if device == "cuda" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch_size, args.steps, args.warmup,
                                 args.device)))
        return
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}

    results = []
    for rows in args.rows:
        for variant in ("torchrec", "plain"):  # interleaved, so drift hits both alike
            out = subprocess.run([sys.executable, __file__, "--one", variant, str(rows), "--batch-size",
                                  str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--device", args.device],
                                 capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{variant} rows {rows} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{variant:8s} rows {rows:>10,}: {r['examples_per_s']:9,.0f} examples/s, "
                  f"+{r['model_memory_mib']:7.1f} MiB", flush=True)
    def result(rows, variant):
        return next(r for r in results if r["rows"] == rows and r["variant"] == variant)

    # Memory growth over the smallest table isolates table + optimizer state from fixed costs
    # (the TorchRec run also holds the Trainer's split copies of the data).
    for r in results:
        r["memory_growth_mib"] = r["model_memory_mib"] - result(min(args.rows), r["variant"])["model_memory_mib"]
    ratios = [{"rows": rows,
               "torchrec_over_plain_examples_per_s":
                   result(rows, "torchrec")["examples_per_s"] / result(rows, "plain")["examples_per_s"]}
              for rows in args.rows]
    import torch
    report = {"benchmark": "train_throughput", "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, 1 thread, torch {torch.__version__}"
                         + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
              "device": args.device,
              "optimizers": {"torchrec": "fbgemm fused EXACT_ROWWISE_ADAGRAD (recsys/train.py)",
                             "plain": "bench/rowwise_adagrad.py RowWiseAdagrad, same lr and eps",
                             "tower": "torch.optim.Adam, both"},
              "results": results, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| table rows | TorchRec examples/s | plain examples/s | TorchRec / plain | "
          "TorchRec memory (growth) MiB | plain memory (growth) MiB |")
    print("|---|---|---|---|---|---|")
    for ratio in ratios:
        tr, pl = result(ratio["rows"], "torchrec"), result(ratio["rows"], "plain")
        print(f"| {ratio['rows']:,} | {tr['examples_per_s']:,.0f} | {pl['examples_per_s']:,.0f} | "
              f"{ratio['torchrec_over_plain_examples_per_s']:.2f}x | {tr['model_memory_mib']:.0f} "
              f"(+{tr['memory_growth_mib']:.0f}) | {pl['model_memory_mib']:.0f} (+{pl['memory_growth_mib']:.0f}) |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
