"""Training checkpoints: a model's and its optimizers' tensors (torch.distributed.checkpoint, which
reshards on load: 2 ranks -> 1 works) and a JSON meta beside them saying which model wrote it and
where its run stood.

    <checkpoint>/                   DCP's files, one per rank
    <checkpoint>/plexrec_checkpoint.json
        fingerprint                 of the model (features, embedding, tower, vocabularies): another
                                    model's checkpoint is refused
        epoch, step_in_epoch, global_step, world_size, epoch_log, vocab_sizes
        continual                   the learner's stream position (recsys/continual.py), when it wrote it

A training run keeps ``<out_dir>/checkpoints/step-<global step>``: the latest (to resume) and the
best epoch's (to export); the learner keeps its own under ``<out_dir>/continual``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn

CHECKPOINT_META = "plexrec_checkpoint.json"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a model with other shapes or features."""


def read_meta(path: Path, fingerprint: str | None = None) -> dict[str, Any]:
    """A checkpoint's meta; with ``fingerprint``, refuse one written by another model."""
    meta_path = Path(path) / CHECKPOINT_META
    if not meta_path.is_file():
        raise CheckpointMismatchError(f"{path} is not a plexrec checkpoint (no {CHECKPOINT_META})")
    meta = json.loads(meta_path.read_text())
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another model (fingerprint {meta['fingerprint']}, this "
            f"config gives {fingerprint}): features, embedding, tower or vocabularies differ. "
            "Resume with the config that wrote it, or start without --resume.")
    return meta


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    (Path(path) / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def save_tensors(path: Path, model: nn.Module, optimizer) -> None:
    """The model's and the optimizer's state, every rank its own shards."""
    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(path))


def load_tensors(path: Path, model: nn.Module, optimizer) -> None:
    """Both states back, resharded to this world. The optimizer's state must exist already (DCP loads
    in place: create Adam's before, e.g. with its ``init_state``)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    # a rank that holds no shard of a table has an empty optimizer entry for it
    state["optimizer"]["state"] = {k: v for k, v in state["optimizer"]["state"].items() if v}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def load_weights(model: nn.Module, path: Path, *, no_dist: bool = False) -> None:
    """Only the model's weights (any sharding) into ``model``; ``no_dist``: a plain model outside any
    process group (an export)."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    model.load_state_dict(state["model"])


def run_checkpoints(root: Path) -> list[Path]:
    """A training run's complete checkpoints (``step-*`` with their meta), oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step-*") if (p / CHECKPOINT_META).is_file()) if root.is_dir() else []


def prune(root: Path, keep: set[str]) -> None:
    """Delete a run's checkpoints but the newest (to resume) and those named in ``keep``."""
    root = Path(root)
    keep = keep | {p.name for p in sorted(root.glob("step-*"))[-1:]}
    for old in root.glob("step-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
