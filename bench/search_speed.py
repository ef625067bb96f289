"""The search stage alone: score L behaviours against the target, keep the top k.

    .venv/bin/python bench/search_speed.py [--lengths 200 1000 5000] [--batch-size 256] [--top-k 64] [--device cuda]

DARE searches in a small attention space (d_a = 16, 32, 64); a coupled model
searches in its representation space (64 here). The stage timed is exactly what
the ranker runs: one pooled lookup of B targets + B*L behaviours in the item
table (fbgemm's fused kernel under DistributedModelParallel, 1 rank), the
scaled dot products, and top-k + softmax. Forward only (no_grad), 1 thread; the median
of several repeats; every variant measured in this one run, interleaved, so the
ratios hold even on a noisy machine. ``--device cuda`` runs it on the GPU (timed to the end of the
device's work); the default, cpu, hides any GPU.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from common import machine, now, write_json

from recsys.logs import configure_logging  # noqa: E402

# recsys.sequence and recsys.train are imported where used: importing fbgemm asks torch for a GPU, and
# --device cpu must hide it first

VARIANTS = [("dare", 16), ("dare", 32), ("dare", 64), ("coupled", 64)]
ITEMS, CATEGORIES, TABLE_ROWS = 1_000_000, 1_000, 1_000_000


class Search(torch.nn.Module):
    def __init__(self, dim: int, top_k: int) -> None:
        from recsys.sequence import ItemSpace

        super().__init__()
        self.space = ItemSpace("attention", TABLE_ROWS, dim, 1, 12, device="meta")
        self.top_k = top_k

    def forward(self, target, target_category, history, history_category, lengths):
        from recsys.sequence import search_space

        return search_space(self.space, self.top_k, target, target_category, history, history_category, lengths)


def shard(module: torch.nn.Module) -> torch.nn.Module:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from recsys.train import init_distributed, sharding_plan

    ctx = init_distributed()
    sharders = [EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD})]
    # the plan covers any EBC in the module, here the space's own
    wrapper = torch.nn.Module()
    wrapper.embedding = module  # sharding_plan looks for EBCs anywhere below
    plan = sharding_plan(wrapper, ctx, sharders)
    return DistributedModelParallel(wrapper, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    device=ctx.device, plan=plan, sharders=sharders).module.embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench/results/search_speed.json")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch for a GPU
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()
    configure_logging()
    torch.set_num_threads(1)
    rng = torch.Generator().manual_seed(0)

    modules = {variant: shard(Search(dim, args.top_k)).eval() for variant in VARIANTS for dim in [variant[1]]}
    results = []
    for length in args.lengths:
        b = args.batch_size
        inputs = (torch.randint(1, ITEMS, (b,), generator=rng), torch.randint(1, CATEGORIES, (b,), generator=rng),
                  torch.randint(1, ITEMS, (b * length,), generator=rng),
                  torch.randint(1, CATEGORIES, (b * length,), generator=rng),
                  torch.full((b,), length, dtype=torch.int64))
        inputs = tuple(x.to(args.device) for x in inputs)
        timings = {variant: [] for variant in VARIANTS}
        # no_grad, not inference_mode: fbgemm-gpu-cpu 1.8's fused lookup has no CPU kernel
        # outside autograd dispatch (measured: NotImplementedError under inference_mode)
        with torch.no_grad():
            for variant in VARIANTS:  # warm-up
                modules[variant](*inputs)
            for _ in range(args.repeats):
                for variant in VARIANTS:  # interleaved, so drift hits every variant alike
                    sync()
                    started = time.perf_counter()
                    modules[variant](*inputs)
                    sync()
                    timings[variant].append((time.perf_counter() - started) * 1000)
        coupled_ms = float(np.median(timings[("coupled", 64)]))
        for (mode, dim), ms in timings.items():
            median = float(np.median(ms))
            results.append({"mode": mode, "dim": dim, "length": length, "batch_size": b, "top_k": args.top_k,
                            "ms_per_batch": median, "ms_all": ms, "speedup_vs_coupled_64": coupled_ms / median})
            print(f"L={length:5d} {mode:7s} d={dim:2d}: {median:8.1f} ms/batch "
                  f"({coupled_ms / median:.2f}x coupled 64)", flush=True)

    write_json(args.out, {"benchmark": "search_speed", "measured_at": now(),
                          "machine": machine() + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
                          "device": args.device, "results": results})
    print("\n| L | " + " | ".join(f"{m} {d}" for m, d in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for length in args.lengths:
        cells = [next(r for r in results if r["length"] == length and (r["mode"], r["dim"]) == v) for v in VARIANTS]
        print(f"| {length:,} | " + " | ".join(f"{c['ms_per_batch']:.1f} ms ({c['speedup_vs_coupled_64']:.2f}x)"
                                              for c in cells) + " |")


if __name__ == "__main__":
    main()
