"""``plexrec train``: train a ranker, evaluate it, export a versioned model.

    plexrec train --config configs/ml100k.yaml            # one process (gloo on CPU)
    torchrun --nproc-per-node 2 -m recsys.train_command --config configs/ml100k.yaml

The same flags either way; recsys/train.py is the trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch.distributed as dist

from recsys.config import load_config
from recsys.logs import configure_logging
from recsys.train import Trainer

log = logging.getLogger("plexrec.train")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``section.key=value`` strings -> typed overrides (values parsed as YAML)."""
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {pair!r}: use section.key=value, e.g. --set train.epochs=3")
        overrides[key] = yaml.safe_load(value)
    return overrides


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="run config YAML (default: the embedded ml100k config)")
    parser.add_argument("-o", "--out-dir", help="where checkpoints, metrics, plots and models go")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set embedding.kind=hashed (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the out dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, TorchRec's included")


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.out_dir:
        overrides["train.out_dir"] = args.out_dir
    config = load_config(args.config, overrides)
    trainer = Trainer(config)
    if args.resume:
        checkpoint = trainer.latest_checkpoint()
        if checkpoint is None:
            raise SystemExit(f"--resume: no checkpoint under {trainer.out_dir / 'checkpoints'}")
        trainer.load_checkpoint(checkpoint)
        if trainer.ctx.is_main:
            log.info("resumed from %s (epoch %d, step %d)", checkpoint, trainer.epoch, trainer.step_in_epoch)
    elif (trainer.out_dir / "metrics.jsonl").exists() and trainer.ctx.is_main:
        (trainer.out_dir / "metrics.jsonl").unlink()
    result = trainer.fit(progress=not args.no_progress)
    if trainer.ctx.is_main:
        print(json.dumps({"best_epoch": result["best_epoch"], "epochs": result["epochs"], "test": result["test"],
                          "model_dir": result.get("model_dir"),
                          "plot": str(trainer.out_dir / "training.png")}, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recsys.train_command", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    run_training(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
