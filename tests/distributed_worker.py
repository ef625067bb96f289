"""Run by tests/test_distributed.py under torchrun: a few training steps on W ranks.

Writes the per-step global losses, the sharding of the unified table, test
predictions and a checkpoint to the folder given as argv[1]; argv[2] is the
sequence mode. With argv[3], a feature store's data directory: one epoch streamed from the
user shards rank 0 builds there (recsys/data/example_stream.py), then the test part's
evaluation gathered from both ranks.
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
    # as the shipped sequence configs: DARE's softmax temperature is a learned dense scalar, which DDP
    # must all-reduce with the tower's gradients
    config.sequence.learn_logit_scale = sequence_mode != "none"
    return config.validate()


def streamed_config(store_dir: str):
    config = config_for("dare")
    config.data.source, config.data.store_dir = "feast", store_dir
    config.data.shard_examples, config.data.buffer_shards = 1000, 2  # about 13 shards: uneven per rank
    return config.validate()


def streamed(out: Path, store_dir: str) -> None:
    trainer = Trainer(streamed_config(store_dir), out_dir=out)
    drawn = sum(len(batch) for batch in trainer.batches() if trainer.train_step(batch) is not None)
    users, labels, scores = trainer._predict_streamed(trainer.eval_examples["test"])
    metrics = trainer.evaluate("test")
    checkpoint = trainer.save_checkpoint()
    steps = [None] * trainer.ctx.world_size
    dist.all_gather_object(steps, (trainer.global_step, drawn))
    if trainer.ctx.is_main:
        (out / "result.json").write_text(json.dumps({
            "checkpoint": str(checkpoint), "steps_and_drawn": steps, "test_auc": metrics["auc"],
            "test_predictions": len(scores), "test_pairs": len(set(zip(users.tolist(), scores.tolist()))),
            "train_examples": len(trainer.train_examples), "world_size": trainer.ctx.world_size}))
    dist.barrier()
    dist.destroy_process_group()


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
    if len(sys.argv) > 3:
        streamed(Path(sys.argv[1]), sys.argv[3])
    else:
        main(Path(sys.argv[1]), sys.argv[2])
