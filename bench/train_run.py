"""One timed training run of a config, as `plexrec train` runs it, on the CPU or on a CUDA GPU.

    .venv/bin/python bench/train_run.py --config configs/ml100k_sequence.yaml [--device cpu|cuda]

recsys.train.Trainer on one rank (DistributedModelParallel, fbgemm's fused row-wise Adagrad
on every table): the whole fit (every epoch, validation, checkpoints, test, export), with the
training passes timed alone (examples/s counts forward + backward + update of the epochs' training
examples, batches made on the fly as in a real run). It also records what ran where: the sharding
plan's compute kernel per table and the class and device of the embedding modules that TorchRec
built (fbgemm's SplitTableBatchedEmbeddingBagsCodegen on CUDA, its CPU variant on the CPU).
``--device cpu`` hides any GPU (CUDA_VISIBLE_DEVICES=''), so the CPU run is a CPU run anywhere.
On CUDA, after the fit, a few more training steps run under torch.profiler and the GPU kernels they
launched are recorded (fbgemm's fused forward and row-wise Adagrad backward among them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def versions() -> dict:
    import fbgemm_gpu
    import torch
    import torchrec
    return {"python": platform.python_version(), "torch": torch.__version__,
            "fbgemm_gpu": f"{getattr(fbgemm_gpu, '__version__', '?')} ({getattr(fbgemm_gpu, '__variant__', '?')})",
            "torchrec": getattr(torchrec, "__version__", "?"), "cuda": torch.version.cuda}


def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def embedding_kernels(model) -> list[dict]:
    """The fbgemm modules TorchRec built under each sharded collection's lookups (they hang off a plain
    list, not below named_modules): class, where the weights live, optimizer, tables."""
    found = []
    for path, sharded in model.named_modules():
        for lookup in getattr(sharded, "_lookups", None) or []:
            for name, module in lookup.named_modules():
                kind = type(module).__name__
                if "TableBatchedEmbedding" not in kind:
                    continue
                weights = [getattr(module, w, None) for w in ("weights_dev", "weights_uvm", "weights_host")]
                weights = [w for w in weights if w is not None and w.numel() > 0]
                found.append({"module": f"{path}.{name}", "class": f"{type(module).__module__}.{kind}",
                              "weights_device": str(weights[0].device) if weights else None,
                              "optimizer": str(getattr(module, "optimizer", "")),
                              # (rows, dim, location, compute device) per table
                              "tables": [[getattr(x, "name", str(x)) for x in spec]
                                         for spec in getattr(module, "embedding_specs", [])]})
    return found


def profile_steps(trainer, steps: int) -> dict:
    """The CUDA kernels of ``steps`` training steps (after the fit: the exported model is unaffected)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    batches = trainer.batches()
    for _ in range(2):  # warm
        trainer.train_step(next(batches))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step(next(batches))
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.events():
        # GPU-side ranges of record_function (TorchRec's "[lookup]_[...]", "DistributedDataParallel.forward")
        # are CUDA events too, spanning kernels and idle time: not kernels
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    return {"steps": steps, "cuda_kernels": len(kernels),
            "kernel_us_per_step": sum(v[1] for v in kernels.values()) / steps,
            "fbgemm_embedding_kernels": [{"name": name[:200], "calls": c, "us": t} for name, (c, t) in ranked
                                         if "embedding" in name.lower()],
            "top_kernels": [{"name": name[:200], "calls": c, "us": t} for name, (c, t) in ranked[:12]]}


def plan_of(model) -> list[dict]:
    rows = []
    for path, module_plan in model.plan.plan.items():
        for table, options in module_plan.items():
            rows.append({"module": path, "table": table, "sharding_type": options.sharding_type,
                         "compute_kernel": options.compute_kernel, "ranks": options.ranks})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/ml100k_sequence.yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile-steps", type=int, default=5, help="CUDA only: steps profiled after the fit (0: none)")
    parser.add_argument("--out", default="bench/results/train_run.json")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch for a GPU

    import torch
    import yaml

    from recsys.config import load_config
    from recsys.logs import configure_logging
    from recsys.train import Trainer

    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    overrides = {key: yaml.safe_load(value) for key, _, value in (pair.partition("=") for pair in args.set)}
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    out_dir = tempfile.mkdtemp(prefix="plexrec-train-run-")
    overrides["train.out_dir"] = out_dir
    config = load_config(ROOT / args.config, overrides)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    trainer = Trainer(config)
    if trainer.ctx.device.type != args.device:
        raise SystemExit(f"the trainer chose {trainer.ctx.device}, not {args.device}")
    setup_seconds = time.perf_counter() - started
    train_seconds: list[float] = []
    train_epoch = trainer.train_epoch

    def timed_train_epoch(progress: bool = True) -> float:
        sync()
        begun = time.perf_counter()
        loss = train_epoch(progress)
        sync()
        train_seconds.append(time.perf_counter() - begun)
        return loss

    trainer.train_epoch = timed_train_epoch  # fit() calls self.train_epoch
    began_fit = time.perf_counter()
    result = trainer.fit(progress=False)
    fit_seconds = time.perf_counter() - began_fit
    train_examples = len(trainer.train_examples)
    report = {
        "benchmark": "train_run", "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": args.config, "overrides": {k: v for k, v in overrides.items() if k != "train.out_dir"},
        "device": args.device, "device_name": device_name(args.device), "versions": versions(),
        "train_examples": train_examples, "batch_size": config.train.batch_size,
        "steps_per_epoch": trainer.steps_per_epoch, "epochs": result["epochs"], "best_epoch": result["best_epoch"],
        "setup_seconds": setup_seconds, "fit_seconds": fit_seconds, "wall_seconds": setup_seconds + fit_seconds,
        "train_seconds_per_epoch": train_seconds,
        "train_examples_per_s": train_examples * len(train_seconds) / sum(train_seconds),
        "test": result["test"], "valid_best": {k: v for k, v in (result["valid"] or {}).items() if k.startswith("valid_")},
        "embedding_kernels": embedding_kernels(trainer.model), "plan": plan_of(trainer.model),
    }
    if args.device == "cuda" and args.profile_steps > 0:
        try:
            report["profile"] = profile_steps(trainer, args.profile_steps)
        except Exception as error:  # the profiler needs CUPTI; the timings above stand without it
            report["profile"] = {"error": repr(error)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"{args.device} ({report['device_name']}): {report['epochs']} epochs, wall {report['wall_seconds']:.1f} s "
          f"(setup {setup_seconds:.1f} s, fit {fit_seconds:.1f} s, training passes {sum(train_seconds):.1f} s), "
          f"{report['train_examples_per_s']:,.0f} train examples/s, test AUC {result['test']['auc']:.4f}")
    for kernel in report["embedding_kernels"]:
        print(f"  {kernel['module']}: {kernel['class']} on {kernel['weights_device']}, {kernel['optimizer']}, "
              f"tables {kernel['tables']}")
    for kernel in report.get("profile", {}).get("fbgemm_embedding_kernels", [])[:8]:
        print(f"  CUDA kernel {kernel['name'][:110]}: {kernel['calls']} calls, {kernel['us']:.0f} us")
    if "error" in report.get("profile", {}):
        print(f"  profiler: {report['profile']['error']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
