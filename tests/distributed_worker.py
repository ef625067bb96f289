"""Run by tests/test_distributed.py under torchrun: a few training steps on W ranks.

Writes the per-step global losses, the sharding of the unified table, test
predictions and a checkpoint to the folder given as argv[1]; argv[2] is the
sequence mode.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from features.examples import build_examples
from features.movielens import load_movielens
from recsys.train import Trainer
from tests.conftest import ML100K, small_config

STEPS = 12


def config_for(sequence_mode: str):
    config = small_config()
    config.sequence.mode, config.sequence.top_k, config.data.max_history = sequence_mode, 8, 50
    return config.validate()


def main(out: Path, sequence_mode: str) -> None:
    frame, schema = load_movielens(ML100K)
    examples = build_examples(frame[frame.user_id <= 120], schema)
    trainer = Trainer(config_for(sequence_mode), examples=examples, out_dir=out)
    batches = trainer.batches()
    losses = [trainer.train_step(next(batches)) for _ in range(STEPS)]
    checkpoint = trainer.save_checkpoint()
    predictions = trainer.predict(trainer.eval_examples["test"])
    sharding = trainer.model.plan.plan["embedding.ebc"]["unified"]
    if trainer.ctx.is_main:
        (out / "result.json").write_text(json.dumps({
            "losses": losses, "checkpoint": str(checkpoint), "predictions": predictions.tolist(),
            "unified_sharding": sharding.sharding_type, "ranks": sharding.ranks,
            "world_size": trainer.ctx.world_size}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
