"""Training on TorchRec DistributedModelParallel: one process, or many under torchrun.

    plexrec train --config configs/ml100k.yaml            # one process (gloo on CPU)
    torchrun --nproc-per-node 2 -m recsys.train_command --config configs/ml100k.yaml   (recsys/train_command.py)

Embedding tables are sharded by TorchRec (the unified table row-wise when there
are several ranks) and updated by fbgemm's fused row-wise Adagrad inside the
backward pass; the dense tower is data-parallel (DDP) and uses Adam. Each rank
takes a contiguous slice of every global batch, so any number of ranks sees
the batches one process would. Checkpoints use torch.distributed.checkpoint and
reshard on load (2 ranks -> 1 works). The epoch with the best validation metric is kept:
evaluated on test, exported as a versioned model directory (recsys/export.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from recsys import checkpoints
from recsys.config import STOPPING_METRICS, RunConfig, default_features
from features.errors import ConfigError
from features.event_log import compact_event_log
from features.example_sql import EngineSettings
from features.example_tables import ExampleTables, build_example_tables
from features.store import data_dir, read_store_meta, stored_schema
from recsys.data.batching import iterate_batches, model_inputs, num_steps
from recsys.data.example_stream import ShardedExamples, ShardedPart
from features.examples import Examples, SplitRule, TEST, TRAIN, VALID
from recsys.data.dataset import check_store_schema, load_dataset
from recsys.embeddings import UNIFIED_TABLE
from recsys.export import export_model, model_fingerprint
from recsys.known_warnings import torchrec_calls
from recsys.metrics import ranking_metrics
from recsys.model import Ranker, build_ranker
from recsys.plots import plot_training

log = logging.getLogger("plexrec.train")

@dataclass
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistributedContext:
    """Join torchrun's process group, or make a one-process group (DMP needs one)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")  # TorchRec's planner reads it
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistributedContext(rank, world_size, device)


def vocabularies_of(train: Examples | ShardedPart, feature_names: list[str], kind: str) -> dict[str, torch.Tensor]:
    """The raw ids seen in training, per feature: the rows of full-vocabulary tables and the sizes
    of hashed ones. A unified table hashes every id into its shared rows: it needs none (and
    finding them is a pass over every streamed shard: 64 s at 1M rows), so its are empty."""
    if kind == "unified":
        return {name: torch.zeros(0, dtype=torch.int64) for name in feature_names}
    if isinstance(train, ShardedPart):
        return {name: torch.from_numpy(ids) for name, ids in train.distinct_ids(feature_names).items()}
    return {name: torch.from_numpy(np.unique(train.feature_values[name])) for name in feature_names}


def training_examples(config: RunConfig, ctx: DistributedContext, out_dir: Path) -> Examples | ShardedExamples:
    """The examples a run reads: in memory (load_dataset), or, from the feature store with
    ``data.shard_examples`` > 0, streamed from user shards that rank 0 builds in the run directory
    (recsys/data/example_stream.py: memory set by the shuffle buffer, not by the data)."""
    data = config.data
    if data.source != "feast" or data.shard_examples <= 0:
        return load_dataset(data)[0]

    directory = data_dir(data.store_dir)
    schema = stored_schema(directory)
    check_store_schema(data, schema)
    split = SplitRule.of(data)
    folder = out_dir / "examples"
    if ctx.is_main:
        log.info("event log: %s", compact_event_log(directory).summary())
        tables = build_example_tables(directory / "offline", schema, folder, split=split,
                                      shard_examples=data.shard_examples, min_shards=ctx.world_size,
                                      settings=EngineSettings(memory_limit=data.engine_memory),
                                      engine=data.example_engine)
        log.info("examples from the store, streamed from %s: %s", folder, tables.summary())
    if ctx.world_size > 1:
        dist.barrier()
    return ShardedExamples(ExampleTables.open(folder), schema, split, int(read_store_meta(directory)["history_length"]),
                           buffer_shards=data.buffer_shards)


def sharding_plan(model: Ranker, ctx: DistributedContext,
                  sharders: list[EmbeddingBagCollectionSharder]) -> ShardingPlan:
    """Every table on fbgemm's fused kernel; the unified table row-wise across several ranks.

    The planner decides, constrained to the fused kernel (left alone it puts small
    tables on the dense kernel, whose CPU backward has no registered autograd
    kernel) and, with several ranks, to row-wise for the unified table. On CPU
    TorchRec's planner never proposes row-wise (measured), so with several CPU
    ranks the plan is written out: unified row-wise, other tables table-wise
    round-robin.
    """
    collections = {name: module for name, module in model.named_modules()
                   if isinstance(module, EmbeddingBagCollection)}
    tables = [config.name for ebc in collections.values() for config in ebc.embedding_bag_configs()]
    if ctx.world_size > 1 and ctx.device.type == "cpu":
        def placement(name: str, i: int):
            if name == UNIFIED_TABLE:
                return row_wise(compute_kernel="fused")
            return table_wise(rank=i % ctx.world_size, compute_kernel="fused")

        plan = {}
        for path, ebc in collections.items():
            per_table = {config.name: placement(config.name, tables.index(config.name))
                         for config in ebc.embedding_bag_configs()}
            plan[path] = construct_module_sharding_plan(ebc, per_table, local_size=ctx.world_size,
                                                        world_size=ctx.world_size, device_type="cpu")
        return ShardingPlan(plan)
    constraints = {name: ParameterConstraints(compute_kernels=["fused"]) for name in tables}
    if ctx.world_size > 1 and UNIFIED_TABLE in constraints:
        constraints[UNIFIED_TABLE].sharding_types = [ShardingType.ROW_WISE.value]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type), constraints=constraints)
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def initialize_tables(model: DistributedModelParallel, seed: int) -> None:
    """Fill every embedding shard from one seeded full-table init.

    DMP initialises each shard on its own, so a 2-rank and a 1-rank run would
    start from different tables. Here row block c of a table is drawn from
    generator (seed, table, c) whatever rank holds it: every sharding starts
    from the same weights. Uniform(+-sqrt(1/rows)), TorchRec's default range.
    """
    block = 1 << 16
    for key, value in model.state_dict().items():
        if "embedding_bags" not in key or not key.endswith(".weight"):
            continue
        shards = ([(s.tensor, s.metadata.shard_offsets) for s in value.local_shards()]
                  if isinstance(value, ShardedTensor) else [(value, [0, 0])])
        full_rows, full_cols = value.size()
        bound = math.sqrt(1.0 / full_rows)
        table_seed = int.from_bytes(key.encode(), "little") % (1 << 31)
        for tensor, (row0, col0) in shards:
            rows, cols = tensor.shape
            for first in range((row0 // block) * block, row0 + rows, block):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + table_seed + first // block)
                n = min(block, full_rows - first)
                chunk = (torch.rand(n, full_cols, generator=gen) * 2 - 1) * bound
                lo, hi = max(first, row0), min(first + n, row0 + rows)
                with torch.no_grad():
                    tensor[lo - row0:hi - row0].copy_(chunk[lo - first:hi - first, col0:col0 + cols])


def set_table_learning_rate(fused_optimizer, table: str, learning_rate: float) -> None:
    """Set the rate of ``table``'s fused optimizer. TorchRec keeps one per table group (a table of
    its own module, like the sequence's attention table, is a group alone); the kernel takes the
    rate at the forward pass from a tensor that the optimizer's zero_grad and step copy
    ``param_groups[0]["lr"]`` into, so it is copied here too: else the first step used the old rate."""
    found = []

    def walk(optimizer) -> None:
        if hasattr(optimizer, "optimizers"):  # a CombinedOptimizer: (name, optimizer) pairs
            for _, inner in optimizer.optimizers:
                walk(inner)
        elif any(name.endswith(f"embedding_bags.{table}.weight") for name in getattr(optimizer, "params", {})):
            found.append(optimizer)

    walk(fused_optimizer)
    if not found:
        raise ConfigError(f"no fused optimizer holds the table {table!r}")
    for optimizer in found:
        if len(optimizer.params) != 1:
            raise ConfigError(f"the table {table!r} shares its fused optimizer with {sorted(optimizer.params)}")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        optimizer.zero_grad()  # no gradients yet: only the copy of the rate into the kernel


def _torchrec_call(method):
    """Run a Trainer method with TorchRec's known-harmless warnings silenced (recsys/known_warnings.py)."""
    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with torchrec_calls():
            return method(*args, **kwargs)
    return quiet


class Trainer:
    """One training run: data, sharded model, optimizers, checkpoints, evaluation, export."""

    @_torchrec_call
    def __init__(self, config: RunConfig, *, examples: Examples | None = None,
                 ctx: DistributedContext | None = None, out_dir: str | Path | None = None,
                 vocab_sizes: dict[str, int] | None = None) -> None:
        """``vocab_sizes``: the tables of a run being continued (its checkpoint's meta records them), not
        of this data's training split; ``load_checkpoint`` then fills in the vocabularies themselves (a
        full-vocabulary model keeps them in its state). recsys/continual.py uses it."""
        self.config = config
        self.ctx = ctx or init_distributed()
        self.out_dir = Path(out_dir or config.train.out_dir)
        if examples is None:
            examples = training_examples(config, self.ctx, self.out_dir)
        examples = examples.keep_dense(config.data.dense)
        if not config.features:  # every feature the data set offers
            config = dataclasses.replace(config, features=default_features(examples.feature_names))
            self.config = config
        self.feature_names = [f.name for f in config.features]
        unknown = [name for name in self.feature_names if name not in examples.feature_names]
        if unknown:
            raise ConfigError(f"features.{unknown[0]}: not a feature of the data set, which offers "
                              f"{', '.join(examples.feature_names)}; fix the config's features list")
        if self.config.sequence.mode != "none" and "item_id" not in self.feature_names:
            raise ConfigError("sequence models need the feature 'item_id' (the target item) in features")
        # sequence models also read the target's category and the history
        self.batch_features, self.history_length = model_inputs(config, examples.feature_names)
        self.train_examples = examples.split_part(TRAIN)
        self.eval_examples = {"valid": examples.split_part(VALID), "test": examples.split_part(TEST)}
        self.dense_names = examples.dense_names
        self.schema = examples.schema
        self.vocabularies = (
            vocabularies_of(self.train_examples, self.feature_names, config.embedding.kind) if vocab_sizes is None
            else {name: torch.zeros(vocab_sizes[name], dtype=torch.int64) for name in self.feature_names})
        self.vocab_sizes = {name: int(len(v)) for name, v in self.vocabularies.items()}
        self.fingerprint = model_fingerprint(config, self.vocab_sizes, self.dense_names)

        torch.manual_seed(config.train.seed)
        plain = build_ranker(config, self.vocabularies, len(self.dense_names), embedding_device="meta")
        self.embedding_parameters = sum(c.num_embeddings * c.embedding_dim for module in plain.modules()
                                        if isinstance(module, EmbeddingBagCollection)
                                        for c in module.embedding_bag_configs())
        sharders = [EmbeddingBagCollectionSharder(fused_params={
            "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "learning_rate": config.train.embedding_lr,
            "eps": 1e-8,
            "weight_decay": config.train.weight_decay,
        })]
        self.model = DistributedModelParallel(
            plain, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=self.ctx.device,
            plan=sharding_plan(plain, self.ctx, sharders), sharders=sharders)
        initialize_tables(self.model, config.train.seed)
        self.dense_optimizer = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(self.model.named_parameters())),
            lambda params: torch.optim.Adam(params, lr=config.train.dense_lr,
                                            weight_decay=config.train.weight_decay))
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, self.dense_optimizer])
        if config.train.attention_lr is not None:
            set_table_learning_rate(self.model.fused_optimizer, {"dare": "attention", "coupled": "coupled"}[
                config.sequence.mode], config.train.attention_lr)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.truncated_histories = 0  # training examples whose history was cut to data.max_history
        self.epoch_log: list[dict[str, Any]] = []  # one record per finished epoch

    # --- training ---

    @property
    def steps_per_epoch(self) -> int:
        if isinstance(self.train_examples, ShardedPart):
            return self.train_examples.steps(self.config.train.batch_size, self.ctx.world_size)
        return num_steps(len(self.train_examples), self.config.train.batch_size)

    def batches(self):
        batches = self.train_examples.batches if isinstance(self.train_examples, ShardedPart) else functools.partial(
            iterate_batches, self.train_examples)
        return batches(self.batch_features, self.config.train.batch_size,
                               shuffle=True, seed=self.config.train.seed, epoch=self.epoch,
                               rank=self.ctx.rank, world_size=self.ctx.world_size,
                               start_step=self.step_in_epoch, history_length=self.history_length)

    def train_step(self, batch) -> float:
        """One optimiser step on this rank's share of a global batch; returns the global mean loss."""
        self.model.train()
        self.truncated_histories += batch.truncated_histories
        batch = batch.to(self.ctx.device)
        logits = self.model(batch.dense, batch.sparse)
        loss = self.loss_fn(logits, batch.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step_in_epoch += 1
        self.global_step += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return self._global_mean(loss.detach(), len(batch))

    def _global_mean(self, local_mean: torch.Tensor, local_count: int) -> float:
        if self.ctx.world_size == 1:
            return float(local_mean)
        summed = torch.stack([local_mean.double() * local_count, torch.tensor(float(local_count), dtype=torch.float64)])
        summed = summed.to(self.ctx.device)
        dist.all_reduce(summed)
        return float(summed[0] / summed[1])

    def _all_ranks_sum(self, value: int) -> int:
        if self.ctx.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(total)
        return int(total)

    @_torchrec_call
    def train_epoch(self, progress: bool = True) -> float:
        epoch = self.epoch
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}",
                   unit="step", disable=not (progress and self.ctx.is_main), leave=False, file=sys.stderr)
        losses = []
        for batch in self.batches():
            losses.append(self.train_step(batch))
            bar.update(1)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        return float(np.mean(losses)) if losses else float("nan")

    # --- evaluation ---

    @torch.no_grad()
    @_torchrec_call
    def predict(self, examples: Examples) -> np.ndarray:
        """Click probabilities for ``examples`` (all ranks call it; every rank gets all of them)."""
        self.model.eval()
        parts = []
        for batch in iterate_batches(examples, self.batch_features, self.config.train.batch_size * 4,
                                     shuffle=False, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                     history_length=self.history_length, every_example=True):
            batch = batch.to(self.ctx.device)
            parts.append(torch.sigmoid(self.model(batch.dense, batch.sparse)).cpu().numpy())
        local = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        if self.ctx.world_size == 1:
            return local
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, parts)
        # undo the rank slicing: batch b's slices, rank 0 first
        return np.concatenate([gathered[r][b] for b in range(len(parts)) for r in range(self.ctx.world_size)])

    def evaluate(self, split: str) -> dict[str, float]:
        examples = self.eval_examples[split]
        if isinstance(examples, ShardedPart):
            return ranking_metrics(*self._predict_streamed(examples))
        return ranking_metrics(examples.user_id, examples.label, self.predict(examples))

    @torch.no_grad()
    @_torchrec_call
    def _predict_streamed(self, part: ShardedPart) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, labels, click probabilities) of a streamed part: each rank scores its own shards,
        then every rank gets all of them. A sharded model's forward is collective, so a rank with
        fewer batches scores its last one again (discarded) until every rank is done."""
        self.model.eval()
        size = self.config.train.batch_size * 4
        users, labels, scores = [], [], []
        per_rank = [sum(-(-int(part.counts[s]) // size) for s in part.shards_of(r, self.ctx.world_size))
                    for r in range(self.ctx.world_size)]
        last = None
        batches = (batch for examples in part.in_order(self.ctx.rank, self.ctx.world_size)
                   for batch in iterate_batches(examples, self.batch_features, size, shuffle=False,
                                                history_length=self.history_length))
        for i in range(max(per_rank)):
            batch = next(batches, None)
            if batch is not None:
                last = batch
            elif last is None:  # nothing of this part here: any one example of the rank's will do
                shards = range(self.ctx.rank, part.source.tables.shards, self.ctx.world_size)
                any_examples = next(e for e in map(part.source.read, shards) if e is not None)
                last = iterate_batches(any_examples, self.batch_features, 1, shuffle=False,
                                       history_length=self.history_length).__next__()
            device_batch = (batch or last).to(self.ctx.device)
            probabilities = torch.sigmoid(self.model(device_batch.dense, device_batch.sparse)).cpu().numpy()
            if batch is not None:
                scores.append(probabilities)
                users.append(batch.user_ids.numpy())
                labels.append(batch.labels.numpy())
        local = [np.concatenate(x) if x else np.zeros(0) for x in (users, labels, scores)]
        if self.ctx.world_size == 1:
            return tuple(local)
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, local)
        return tuple(np.concatenate([g[k] for g in gathered]) for k in range(3))

    # --- checkpoints ---

    @_torchrec_call
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.out_dir / "checkpoints" / f"step-{self.global_step:08d}")
        checkpoints.save_tensors(path, self.model, self.optimizer)
        self._write_checkpoint_meta(path)
        dist.barrier()
        return path

    def _write_checkpoint_meta(self, path: Path) -> None:
        if self.ctx.is_main:
            checkpoints.write_meta(path, {
                "fingerprint": self.fingerprint, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "world_size": self.ctx.world_size, "epoch_log": self.epoch_log,
                "vocab_sizes": self.vocab_sizes})

    @_torchrec_call
    def load_checkpoint(self, path: str | Path) -> None:
        """Resume: weights, optimizer states and where the run stood (CheckpointMismatchError for another
        model's checkpoint)."""
        meta = checkpoints.read_meta(Path(path), self.fingerprint)
        self.dense_optimizer.init_state()  # Adam makes its state at the first step; DCP loads in place
        checkpoints.load_tensors(Path(path), self.model, self.optimizer)
        self.epoch, self.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.global_step, self.epoch_log = meta["global_step"], meta.get("epoch_log", [])

    def latest_checkpoint(self) -> Path | None:
        found = checkpoints.run_checkpoints(self.out_dir / "checkpoints")
        return found[-1] if found else None

    def _prune_checkpoints(self) -> None:
        """Keep the latest checkpoint (to resume) and the best epoch's (to export)."""
        if self.ctx.is_main:
            best = self.best_epoch()
            checkpoints.prune(self.out_dir / "checkpoints", {best["checkpoint"]} if best else set())

    # --- the whole run ---

    @_torchrec_call
    def fit(self, progress: bool = True) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.ctx.is_main:
            log.info("training %s embeddings, sequence mode %s: %d embedding parameters, %d train / %d valid / "
                     "%d test examples, %d rank(s) on %s", self.config.embedding.kind, self.config.sequence.mode,
                     self.embedding_parameters,
                     len(self.train_examples), len(self.eval_examples["valid"]), len(self.eval_examples["test"]),
                     self.ctx.world_size, self.ctx.device)
        epochs = tqdm(total=self.config.train.epochs, initial=self.epoch, desc="training", unit="epoch",
                      disable=not (progress and self.ctx.is_main), file=sys.stderr)
        stopped_early = False
        while self.epoch < self.config.train.epochs:
            if self._epochs_without_improvement() >= self.config.train.early_stopping_patience > 0:
                stopped_early = True
                break
            started = time.perf_counter()
            train_loss = self.train_epoch(progress)
            valid = self.evaluate("valid")
            truncated = self._all_ranks_sum(self.truncated_histories)
            record = {"epoch": self.epoch, "train_loss": train_loss,
                      **{f"valid_{k}": v for k, v in valid.items()},
                      "truncated_histories": truncated,
                      "seconds": round(time.perf_counter() - started, 2)}
            best = self.best_epoch()
            improved = best is None or self._better(record, best)
            if improved or self.config.train.checkpoint_every_epoch:  # the best is always kept
                record["checkpoint"] = self.save_checkpoint().name
            self.epoch_log.append(record)
            if "checkpoint" in record:  # rewrite the checkpoint's meta: it holds its own record now
                self._write_checkpoint_meta(self.out_dir / "checkpoints" / record["checkpoint"])
            self._prune_checkpoints()
            if self.ctx.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                epochs.set_postfix(loss=f"{train_loss:.4f}", valid_auc=f"{valid['auc']:.4f}")
                log.info("epoch %d: train loss %.4f, valid AUC %.4f GAUC %.4f log loss %.4f%s%s (%.0f s)", self.epoch,
                         train_loss, valid["auc"], valid["gauc"], valid["logloss"], " - best so far" if improved else "",
                         f", {truncated} histories truncated to {self.history_length} so far" if truncated else "",
                         record["seconds"])
            epochs.update(1)
        epochs.close()
        best = self.best_epoch()
        if stopped_early and self.ctx.is_main:
            log.info("stopped early after epoch %d: no better validation %s for %d epochs", self.epoch,
                     self.config.train.early_stopping_metric, self.config.train.early_stopping_patience)
        # the latest state stays resumable; the best one is evaluated, reported and exported
        latest = self.latest_checkpoint()
        if latest is None or checkpoints.read_meta(latest)["global_step"] != self.global_step:
            self.save_checkpoint()
        best_checkpoint = self.out_dir / "checkpoints" / best["checkpoint"] if best else self.latest_checkpoint()
        self.load_model_weights(best_checkpoint)
        test = self.evaluate("test")
        final = {"test": test, "valid": best, "best_epoch": best["epoch"] if best else self.epoch,
                 "embedding_parameters": self.embedding_parameters, "epochs": self.epoch,
                 "stopped_early": stopped_early,
                 # the newest event of the run's data (schema's unit): a learner that follows the stream from
                 # this model takes streamed events after it (recsys/learn.py)
                 "data_until": self._data_until()}
        if self.ctx.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"final": True, "best_epoch": final["best_epoch"], "epochs": self.epoch,
                                    **{k: v for k, v in (best or {}).items() if k.startswith("valid_")},
                                    **{f"test_{k}": v for k, v in test.items()}}) + "\n")
            final["model_dir"] = str(self.export(best_checkpoint, final))
            plot_training(self.epoch_log, self.out_dir / "training.png", final["best_epoch"])
            log.info("best epoch %d of %d (valid %s %.4f): test AUC %.4f GAUC %.4f log loss %.4f (%d examples); "
                     "model %s", final["best_epoch"], self.epoch, self.config.train.early_stopping_metric,
                     (best or {}).get(f"valid_{self.config.train.early_stopping_metric}", float("nan")),
                     test["auc"], test["gauc"], test["logloss"], test["examples"], final["model_dir"])
        dist.barrier()
        return final

    # --- model selection ---

    def _better(self, record: dict[str, Any], than: dict[str, Any]) -> bool:
        metric = self.config.train.early_stopping_metric
        new, old = record[f"valid_{metric}"], than[f"valid_{metric}"]
        if not math.isfinite(new):
            return False
        return not math.isfinite(old) or (new - old) * STOPPING_METRICS[metric] > 0

    def _data_until(self) -> int:
        if isinstance(self.train_examples, ShardedPart):
            return int(self.train_examples.source.timestamp_max)
        return max(int(part.timestamp.max()) for part in (self.train_examples, *self.eval_examples.values())
                   if len(part))

    def best_epoch(self) -> dict[str, Any] | None:
        """The epoch record with the best validation metric (the earliest among equals)."""
        best = None
        for record in self.epoch_log:
            if "checkpoint" in record and (best is None or self._better(record, best)):
                best = record
        return best

    def _epochs_without_improvement(self) -> int:
        best = self.best_epoch()
        return 0 if best is None else self.epoch_log[-1]["epoch"] - best["epoch"]

    @_torchrec_call
    def load_model_weights(self, checkpoint: Path) -> None:
        """Only the model's weights from a checkpoint (any sharding), e.g. the best epoch's."""
        checkpoints.load_weights(self.model, checkpoint)

    @_torchrec_call
    def export(self, checkpoint: Path, metrics: dict[str, Any], move_checkpoint: bool = False) -> Path:
        """Rebuild the plain model from a checkpoint (any sharding) and export it, the checkpoint inside
        (copied, or moved): a learner continues a version from its own checkpoint (recsys/continual.py)."""
        plain = build_ranker(self.config, self.vocabularies, len(self.dense_names))
        checkpoints.load_weights(plain, checkpoint, no_dist=True)
        return export_model(plain, self.config, self.vocab_sizes, self.dense_names, metrics, self.out_dir / "models",
                            schema=self.schema, checkpoint=checkpoint, move_checkpoint=move_checkpoint)
