"""fbgemm's fused embedding kernel on CUDA against its CPU kernel: the same lookups, the same updates.

    python bench/tbe_check.py [--out tbe_check.json]

One SplitTableBatchedEmbeddingBagsCodegen table on the GPU (EmbeddingLocation.DEVICE) and one on the
CPU (HOST), from the same weights, with the optimizer plexrec trains with (EXACT_ROWWISE_ADAGRAD,
mean pooling, as recsys/train.py's sharder asks): several steps of forward + backward (the update is
fused into the backward), then the outputs and the updated weights compared (relative error, fp32).
It prints and records the versions and the GPU. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--bag", type=int, default=20, help="ids per bag (Zipf-ish, so rows repeat)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()

    import fbgemm_gpu
    import torch
    import torchrec
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)

    report = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "fbgemm_gpu": f"{getattr(fbgemm_gpu, '__version__', '?')} ({getattr(fbgemm_gpu, '__variant__', '?')})",
              "torchrec": getattr(torchrec, "__version__", "?"), "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps(report), "\nno GPU: nothing to compare")
        return
    report["device_name"] = torch.cuda.get_device_name()
    report["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))

    def table(device: str) -> SplitTableBatchedEmbeddingBagsCodegen:
        location, compute = ((EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device == "cuda"
                             else (EmbeddingLocation.HOST, ComputeDevice.CPU))
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(args.rows, args.dim, location, compute)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=0.05, eps=1e-8, pooling_mode=PoolingMode.MEAN, device=torch.device(device))

    gen = torch.Generator().manual_seed(0)
    weights = (torch.rand(args.rows, args.dim, generator=gen) * 2 - 1) * 0.1
    tables = {device: table(device) for device in ("cpu", "cuda")}
    for device, tbe in tables.items():
        with torch.no_grad():
            tbe.split_embedding_weights()[0].copy_(weights.to(device))
    errors = []
    for _ in range(args.steps):
        lengths = torch.randint(1, 2 * args.bag, (args.batch_size,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        # Zipf-like ids: many repeats within a batch, as real ids have
        ids = (torch.rand(int(lengths.sum()), generator=gen).pow(3) * args.rows).long().clamp_(max=args.rows - 1)
        grad = torch.randn(args.batch_size, args.dim, generator=gen)
        outputs = {}
        for device, tbe in tables.items():
            out = tbe(ids.to(device), offsets.to(device))
            out.backward(grad.to(device))
            outputs[device] = out.detach().cpu()
        torch.cuda.synchronize()
        errors.append(float((outputs["cuda"] - outputs["cpu"]).norm() / outputs["cpu"].norm()))
    updated = {device: tbe.split_embedding_weights()[0].detach().cpu() for device, tbe in tables.items()}
    changed = float((updated["cpu"] - weights).norm() / weights.norm())
    report.update({"rows": args.rows, "dim": args.dim, "batch_size": args.batch_size, "steps": args.steps,
                   "forward_rel_err_per_step": errors,
                   "weights_rel_err_after": float((updated["cuda"] - updated["cpu"]).norm() / updated["cpu"].norm()),
                   "weights_moved_rel": changed,
                   "cuda_module_weights_device": str(tables["cuda"].weights_dev.device)})
    report["ok"] = max(errors) < 1e-4 and report["weights_rel_err_after"] < 1e-4 and changed > 1e-4
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if not report["ok"]:
        raise SystemExit("CUDA and CPU kernels disagree")


if __name__ == "__main__":
    main()
