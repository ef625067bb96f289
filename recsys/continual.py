"""Continual learning: a trained model keeps learning from newly labelled events, in event-time order.

    learner = ContinualLearner.from_model_dir(served_model_dir, first_window)   # or .from_checkpoint(...)
    for window in windows:                                # e.g. the events labelled since the last call
        learner.learn(window)                             # one pass, oldest event first, the run's batch size
        learner.save_checkpoint(position={"offsets": ...})  # model + optimizer state + the caller's stream position
        learner.export()                                  # a new version under <out_dir>/models; serving reloads it

The learner is a training run's ``Trainer`` (recsys/train.py) resumed from one of its checkpoints: the
same sharded model and the same optimizers *with their state* -- fbgemm's fused row-wise Adagrad for the
tables (one running sum of squared gradients per row) and Adam for the tower (moments, step count).
Learning A, checkpointing, and learning B in a new process gives the model one learner gets from A then
B. Exported weights alone would reset both optimizers: every row would take full-size Adagrad steps
again and Adam would restart its bias correction, so the first windows would shake the model.

Time order. ``learn`` sorts the examples it is given by timestamp (a stable sort: events with equal
timestamps keep the order given, the log's order) and makes one pass in batches of
``train.batch_size``, no shuffling, each batch one optimizer step. Callers pass windows in time order
too; ``progress.last_event_time`` is the latest event learned.

New ids. Unified and hashed embeddings hash any raw id to rows, so an item or user first seen in the
stream gets (shared, hashed) rows that learn from its events like any other. The full-vocabulary
baseline has one row per value of its training run and maps every other value to its row 0: it cannot
learn new ids, and all of them train that one shared "unknown" row. ``learn`` counts such values
(``Learned.unknown_values``; always 0 for unified and hashed).

Versions carry their checkpoint. ``export`` writes the checkpoint (tensors, optimizer state, then the
meta with the learner's progress and ``position``, the caller's stream offsets) and the version in one
directory, ``<out_dir>/models/<version>/checkpoint/``, synced and renamed into place whole: a process
killed at any moment leaves the previous version as the newest, and every version, for as long as it
is kept, can be continued from (``from_model_dir``) with the weights it serves, the optimizers' state
and the offsets it learned up to, so a job that continues it and seeks to its ``progress.position``
learns no event twice. Removing a version removes its checkpoint: a removed lineage cannot come back.
A training run's export carries a copy of its best checkpoint the same way. ``base_version`` names
the version a learner's state descends from (recorded in each export's manifest).

``save_checkpoint`` alone writes ``<out_dir>/continual/ckpt-<n>`` (the same crash-safe way; the
newest ``keep_checkpoints`` are kept), for callers that checkpoint without exporting.

One process is the tested case; every call is written so that all ranks of a torchrun group call it
together, as the Trainer's are.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from features.durable import fsync_dir, fsync_tree
from features.examples import Examples
from recsys.config import RunConfig
from recsys.data.batching import iterate_batches
from recsys.embeddings import FullVocabEmbedding
from recsys.export import CHECKPOINT_DIR, ModelArtifactError, read_manifest
from recsys.known_warnings import torchrec_calls
from recsys.metrics import ranking_metrics
from recsys import checkpoints
from recsys.checkpoints import CHECKPOINT_META, CheckpointMismatchError
from recsys.train import Trainer

CONTINUAL_DIR = "continual"  # under the run's out dir: the learner's checkpoints
CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8})")
EXPORT_STAGING = ".export.tmp"  # under CONTINUAL_DIR: the checkpoint of the version being exported


@dataclass
class Progress:
    """What a learner has learned since its training run; saved in each of its checkpoints."""

    examples: int = 0
    steps: int = 0
    last_event_time: int | None = None  # the latest timestamp learned, in the schema's unit
    saves: int = 0
    position: dict[str, Any] = field(default_factory=dict)  # the caller's place in its stream (offsets)


@dataclass
class Learned:
    """One ``learn`` call: the examples' mean log loss, each batch's taken just before its update (a
    test-then-train loss), and how many examples and optimizer steps it took."""

    loss: float
    examples: int
    steps: int
    unknown_values: int = 0  # full vocabulary only: feature values outside it (they all train row 0)


def in_time_order(examples: Examples) -> Examples:
    """The examples sorted by timestamp; equal timestamps keep their order (a stable sort)."""
    order = np.argsort(examples.timestamp, kind="stable")
    return examples if np.array_equal(order, np.arange(len(order))) else examples.subset(order)


def time_windows(examples: Examples, count: int) -> list[Examples]:
    """``count`` consecutive windows of (nearly) equal numbers of examples, in time order."""
    order = np.argsort(examples.timestamp, kind="stable")
    return [examples.subset(part) for part in np.array_split(order, count)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete learner checkpoint under ``<out_dir>/continual``, or None."""
    root = Path(out_dir) / CONTINUAL_DIR
    found = sorted(p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name)
                   and (p / CHECKPOINT_META).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def checkpoint_of(model_dir: str | Path) -> Path:
    """The checkpoint an exported model version was made from (a training run's best epoch, or a
    learner's save): where a learner for that version starts. Its own ``checkpoint/`` where it carries
    one; a version exported before versions did, the one its manifest names under its run directory
    (``<out_dir>/models/<v>``), which may since be pruned."""
    carried = Path(model_dir) / CHECKPOINT_DIR
    if (carried / CHECKPOINT_META).is_file():
        return carried
    manifest = read_manifest(model_dir)
    out_dir = Path(model_dir).resolve().parent.parent
    metrics = manifest.get("metrics") or {}
    if "continual" in metrics:
        path = out_dir / metrics["continual"]["checkpoint"]
    elif (metrics.get("valid") or {}).get("checkpoint"):
        path = out_dir / "checkpoints" / metrics["valid"]["checkpoint"]
    else:
        raise ModelArtifactError(f"{model_dir}: its manifest names no checkpoint (a run without a validated "
                                 "epoch); start a learner from a checkpoint path instead")
    if not (path / CHECKPOINT_META).is_file():
        raise ModelArtifactError(f"{model_dir} was exported from checkpoint {path}, which is gone (pruned?); "
                                 f"start from the run's latest checkpoint instead")
    return path


class ContinualLearner:
    """A trained model that goes on learning: ``learn`` windows of new examples, ``predict``,
    ``save_checkpoint``, ``export`` new versions. Build it with ``from_checkpoint`` or ``from_model_dir``."""

    def __init__(self, trainer: Trainer, *, progress: Progress | None = None, base_checkpoint: Path | None = None,
                 keep_checkpoints: int = 3, base_version: str | None = None) -> None:
        """Take ``trainer`` as it is (its model and optimizer state go on from where they are).
        ``base_version``: the exported version this state descends from (None: not from a version)."""
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints = {keep_checkpoints}: keep at least the latest")
        self.trainer = trainer
        self.progress = progress or Progress()
        self.base_checkpoint = base_checkpoint
        self.keep_checkpoints = keep_checkpoints
        self.base_version = base_version

    @classmethod
    def from_checkpoint(cls, config: RunConfig, checkpoint: str | Path, examples: Examples | None = None, *,
                        out_dir: str | Path | None = None, keep_checkpoints: int = 3) -> ContinualLearner:
        """Resume a training run's or a learner's checkpoint with the config that wrote it.

        ``examples``: any examples of the same data set (the first window will do): they give the
        feature and dense names; the tables' sizes come from the checkpoint (a checkpoint written before
        it recorded them takes them from these examples' training split, as its run did). None: the
        config's data set. ``out_dir`` (default: the run's, ``checkpoint/../..``) receives ``continual/``
        checkpoints and ``models/`` versions.
        """
        checkpoint = Path(checkpoint)
        meta = checkpoints.read_meta(checkpoint)
        vocab_sizes = meta.get("vocab_sizes")
        names = [f.name for f in config.features]
        if vocab_sizes is not None and names and sorted(vocab_sizes) != sorted(names):
            raise CheckpointMismatchError(f"checkpoint {checkpoint} has the features {sorted(vocab_sizes)}, the config "
                                          f"{sorted(names)}; use the config that wrote it")
        trainer = Trainer(config, examples=examples, out_dir=out_dir or checkpoint.resolve().parent.parent,
                          vocab_sizes=vocab_sizes)
        trainer.load_checkpoint(checkpoint)  # refuses another model's checkpoint (fingerprint)
        state = meta.get("continual") or {}  # a learner's checkpoint; a training run's has none
        base = state.get("base_checkpoint") if state else str(checkpoint.resolve())
        return cls(trainer, progress=Progress(**state["progress"]) if state else None,
                   base_checkpoint=Path(base) if base else None, keep_checkpoints=keep_checkpoints,
                   base_version=state.get("base_version"))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, examples: Examples | None = None, *,
                       out_dir: str | Path | None = None, **kwargs) -> ContinualLearner:
        """Continue an exported (e.g. the served) version: its config, and the checkpoint it came from
        (weights, optimizer state, a learner's progress). Its exports go to ``out_dir``: by default the
        version's run directory (``<out_dir>/models/<version>``)."""
        model_dir = Path(model_dir)
        config = RunConfig.from_dict(read_manifest(model_dir)["config"])
        learner = cls.from_checkpoint(config, checkpoint_of(model_dir), examples,
                                      out_dir=out_dir or model_dir.resolve().parent.parent, **kwargs)
        learner.base_version = model_dir.name
        return learner

    @property
    def config(self) -> RunConfig:
        return self.trainer.config

    @property
    def checkpoint_dir(self) -> Path:
        return self.trainer.out_dir / CONTINUAL_DIR

    def _own(self, examples: Examples) -> Examples:
        """The examples with the dense columns this model reads, as the Trainer keeps them."""
        return examples.keep_dense(self.config.data.dense)

    # --- learning ---

    def learn(self, examples: Examples) -> Learned:
        """One pass over ``examples`` in event-time order, ``train.batch_size`` per optimizer step."""
        t = self.trainer
        examples = in_time_order(self._own(examples))
        n, batch_size = len(examples), self.config.train.batch_size
        if n == 0:
            return Learned(float("nan"), 0, 0)
        unknown = self.unknown_values(examples)
        loss_sum, steps = 0.0, 0
        with torchrec_calls():
            for step, batch in enumerate(iterate_batches(
                    examples, t.batch_features, batch_size, shuffle=False, rank=t.ctx.rank,
                    world_size=t.ctx.world_size, history_length=t.history_length)):
                loss_sum += self._step(batch) * min(batch_size, n - step * batch_size)
                steps += 1
        p = self.progress
        p.examples, p.steps = p.examples + n, p.steps + steps
        newest = int(examples.timestamp[-1])
        p.last_event_time = newest if p.last_event_time is None else max(p.last_event_time, newest)
        return Learned(loss_sum / n, n, steps, unknown)

    def _step(self, batch) -> float:
        """One optimizer step on this rank's slice of a global batch (as ``Trainer.train_step``, without
        its epoch bookkeeping); the global batch's mean loss before the update."""
        t = self.trainer
        t.model.train()
        batch = batch.to(t.ctx.device)
        loss = t.loss_fn(t.model(batch.dense, batch.sparse), batch.labels)
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        t.global_step += 1
        return t._global_mean(loss.detach(), len(batch))

    def unknown_values(self, examples: Examples) -> int:
        """Feature values a full-vocabulary model has no row for (0 for unified and hashed embeddings)."""
        embedding = self.trainer.model.module.embedding
        if not isinstance(embedding, FullVocabEmbedding):
            return 0
        return sum(int((embedding.rows(i, 0, torch.from_numpy(examples.feature_values[name])) == 0).sum())
                   for i, name in enumerate(embedding.features))

    # --- scoring ---

    def predict(self, examples: Examples) -> np.ndarray:
        """Click probabilities of ``examples``, in their order."""
        return self.trainer.predict(self._own(examples))

    def evaluate(self, examples: Examples) -> dict[str, float]:
        """AUC, GAUC, log loss of the current model on ``examples`` (recsys/metrics.py)."""
        return ranking_metrics(examples.user_id, examples.label, self.predict(examples))

    # --- checkpoints and versions ---

    def save_checkpoint(self, position: dict[str, Any] | None = None) -> Path:
        """Write model, optimizer state and progress (with ``position``, if given) as the next
        ``continual/ckpt-<n>``: all of it or nothing (temp dir, fsync, rename). Returns its path."""
        t = self.trainer
        if position is not None:
            self.progress.position = dict(position)
        root = self.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        existing = [int(m.group(1)) for p in root.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))]
        self.progress.saves = max([self.progress.saves, *existing]) + 1
        final = root / f"ckpt-{self.progress.saves:08d}"
        staging = root / f".{final.name}.tmp"
        if t.ctx.is_main and staging.exists():  # the leftover of a process killed while saving
            shutil.rmtree(staging)
        if t.ctx.world_size > 1:
            dist.barrier()
        t.save_checkpoint(staging)  # tensors + the Trainer's meta, all ranks
        if t.ctx.is_main:
            self._write_state(staging)
            fsync_tree(staging)
            os.replace(staging, final)
            fsync_dir(root)
            self._prune(keep=final)
        if t.ctx.world_size > 1:
            dist.barrier()
        return final

    def _write_state(self, checkpoint: Path) -> None:
        """The learner's progress (its stream position included) into a checkpoint's meta."""
        meta = checkpoints.read_meta(checkpoint)
        meta["continual"] = {"progress": dataclasses.asdict(self.progress),
                             "base_checkpoint": str(self.base_checkpoint) if self.base_checkpoint else None,
                             "base_version": self.base_version}
        checkpoints.write_meta(checkpoint, meta)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.trainer.out_dir)

    def _prune(self, keep: Path) -> None:
        complete = sorted(p for p in self.checkpoint_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name))
        for old in complete[:-self.keep_checkpoints]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def export(self, metrics: dict[str, Any] | None = None) -> Path | None:
        """Export the model as a new version under ``<out_dir>/models`` (recsys/export.py's artifact,
        which serving reloads by itself) carrying its checkpoint (model, optimizer state, progress with
        the stream position) in ``checkpoint/``: one directory, renamed into place whole, so there is
        never a checkpoint without its version or a version without its checkpoint. Its manifest's
        metrics carry ``continual``: the progress and ``base_version``, the version it descends from.
        The learner's state then descends from the new version. Returns the version directory (None on
        ranks other than 0)."""
        t = self.trainer
        staging = self.checkpoint_dir / EXPORT_STAGING
        if t.ctx.is_main:
            staging.parent.mkdir(parents=True, exist_ok=True)
            if staging.exists():  # the leftover of a process killed while exporting
                shutil.rmtree(staging)
        if t.ctx.world_size > 1:
            dist.barrier()
        t.save_checkpoint(staging)  # tensors + the Trainer's meta, all ranks
        continual = {**dataclasses.asdict(self.progress), "checkpoint": CHECKPOINT_DIR,
                     "base_checkpoint": str(self.base_checkpoint) if self.base_checkpoint else None,
                     "base_version": self.base_version}
        model_dir = None
        if t.ctx.is_main:
            self._write_state(staging)
            model_dir = t.export(staging, {**(metrics or {}), "continual": continual}, move_checkpoint=True)
        if t.ctx.world_size > 1:
            dist.barrier()
            shared: list[Any] = [model_dir.name if model_dir else None]
            dist.broadcast_object_list(shared, src=0)
            self.base_version = shared[0]
        else:
            self.base_version = model_dir.name
        return model_dir
