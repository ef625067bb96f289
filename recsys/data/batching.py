"""Examples -> model batches: dense tensor, KeyedJaggedTensor of raw ids, labels.

The KJT carries one key per categorical feature with *raw* ids; the embedding
module hashes them (see recsys/embeddings.py), so serving can build the same
batch from raw feature values. Sequence models also get the user's history as
two more keys, ``history_item_id`` and ``history_category`` (oldest first, the
most recent ``history_length`` items; longer histories are truncated and counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.examples import Examples, take_jagged

HISTORY_ITEMS = "history_item_id"
HISTORY_CATEGORIES = "history_category"


@dataclass
class Batch:
    dense: torch.Tensor  # [B, num_dense] float32
    sparse: KeyedJaggedTensor  # keys = feature names, values = raw int64 ids
    labels: torch.Tensor  # [B] float32
    user_ids: torch.Tensor  # [B] int64, for per-user metrics
    truncated_histories: int = 0  # histories longer than the limit, cut to the most recent

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.dense.to(device), self.sparse.to(device), self.labels.to(device),
                     self.user_ids.to(device), self.truncated_histories)

    def __len__(self) -> int:
        return len(self.labels)


def model_inputs(config, available_features: list[str]) -> tuple[list[str], int]:
    """(the KJT keys a run config's model reads, its history length): its features, plus the
    target's category for sequence models where the data has one; training and serving agree
    on this by calling it."""
    feature_names = [f.name for f in config.features]
    history_length = config.data.max_history if config.sequence.mode != "none" else 0
    if history_length and "item_category" in available_features and "item_category" not in feature_names:
        feature_names.append("item_category")
    return feature_names, history_length


def make_batch(examples: Examples, index: np.ndarray, feature_names: list[str], history_length: int = 0) -> Batch:
    return make_batch_from_pieces([(examples, index)], feature_names, history_length)


def make_batch_from_pieces(pieces: list[tuple[Examples, np.ndarray]], feature_names: list[str],
                           history_length: int = 0) -> Batch:
    """One batch of the examples ``index`` of each piece, in piece order (a streamed batch draws
    from the several shards of its shuffle buffer: recsys/data/example_stream.py)."""
    values: dict[str, list[np.ndarray]] = {}
    lengths: dict[str, list[np.ndarray]] = {}
    truncated = 0
    keys = list(feature_names)

    def add(name: str, piece_values: np.ndarray, piece_offsets: np.ndarray) -> None:
        values.setdefault(name, []).append(piece_values)
        lengths.setdefault(name, []).append(np.diff(piece_offsets))

    for examples, index in pieces:
        for name in feature_names:
            add(name, *take_jagged(examples.feature_values[name], examples.feature_offsets[name], index))
        if history_length > 0:
            start, end, cut = examples.history_ranges(index, history_length)
            truncated += cut
            history_offsets = np.zeros(len(index) + 1, dtype=np.int64)
            np.cumsum(end - start, out=history_offsets[1:])
            positions = np.repeat(start - history_offsets[:-1], end - start) + np.arange(history_offsets[-1])
            add(HISTORY_ITEMS, examples.sequence_items[positions], history_offsets)
            if examples.sequence_categories is not None:
                add(HISTORY_CATEGORIES, examples.sequence_categories[positions], history_offsets)
    keys += [key for key in (HISTORY_ITEMS, HISTORY_CATEGORIES) if key in values]
    return Batch(
        dense=torch.from_numpy(np.concatenate([e.dense[i] for e, i in pieces])),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate([v for key in keys for v in values[key]]).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate([n for key in keys for n in lengths[key]]).astype(np.int32, copy=False))),
        labels=torch.from_numpy(np.concatenate([e.label[i] for e, i in pieces])),
        user_ids=torch.from_numpy(np.concatenate([e.user_id[i] for e, i in pieces])),
        truncated_histories=truncated,
    )


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: the same on every rank and on resume."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def num_steps(num_examples: int, global_batch_size: int) -> int:
    return -(-num_examples // global_batch_size)


def iterate_batches(examples: Examples, feature_names: list[str], global_batch_size: int, *,
                    shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                    start_step: int = 0, history_length: int = 0, every_example: bool = False) -> Iterator[Batch]:
    """This rank's share of each global batch, from ``start_step`` on.

    Rank r takes the r-th of W equal contiguous slices of every global batch, so W ranks together
    see the batches one process would, up to W - 1 examples of a batch that W does not divide:
    the ranks' batches must be of one size (a row-wise sharded table's backward all-gathers them).
    ``every_example`` (prediction: a forward takes unequal batches): slices differing by at most
    one, none left out.
    """
    order = epoch_order(len(examples), seed, epoch, shuffle)
    for step in range(start_step, num_steps(len(examples), global_batch_size)):
        global_index = order[step * global_batch_size:(step + 1) * global_batch_size]
        if every_example:
            bounds = np.linspace(0, len(global_index), world_size + 1).astype(int)
        else:
            bounds = np.arange(world_size + 1) * (len(global_index) // world_size if world_size > 1 else len(global_index))
        yield make_batch(examples, global_index[bounds[rank]:bounds[rank + 1]], feature_names, history_length)
