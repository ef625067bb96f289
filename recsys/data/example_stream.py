"""Training examples streamed from Parquet shards: memory set by a shuffle buffer, not by the data.

The store's examples are written as user shards (features/example_tables.py: shard ``s`` holds
the examples and the behaviour sequences of the users with ``user_id mod shards == s``), so one
shard is an Examples of its own. Training reads them as a stream:

    epoch e, rank r   the rank's shards (s mod world_size == r), in an order drawn from
                      (seed, epoch, rank)
    shuffle buffer    up to ``buffer_shards`` shards are open at once; their remaining examples
                      form one pool, drawn from in a random order; a shard whose examples are all
                      drawn is closed and the next one opened (its examples join the pool, which
                      is shuffled again)
    steps             every rank takes the same number of steps per epoch (the fewest any rank
                      can fill), of one batch size on all ranks (the last batch as short as the
                      rank with the fewest examples left needs); a rank with more examples leaves
                      its last few for the next epoch's order to reach

Peak memory is ``buffer_shards`` shards plus a batch; the number of shards, chosen when the
examples are built (``shard_examples`` per shard), sets a shard's size. At open, the split's
columns of every shard (user, time, split) are read to count its examples per split part and
find the newest timestamp; one shard is read whole for the feature names. Full-vocabulary tables
take one more pass for the ids seen in training. Evaluation streams the rank's shards in
order and gathers (user, label, prediction) from every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from features.example_tables import ExampleTables, read_shard, shard_split_counts
from recsys.data.batching import Batch, make_batch_from_pieces
from features.examples import Examples, SplitRule


@dataclass
class ShardedExamples:
    """Examples on disk as user shards (an ExampleTables build), read a few shards at a time."""

    tables: ExampleTables
    schema: object
    split: SplitRule
    history_length: int  # the store's: histories are cut to it, as the online store keeps them
    dense: list[str] | None = None  # DataConfig.dense: the dense features kept
    buffer_shards: int = 4

    def __post_init__(self) -> None:
        self.part_counts: dict[int, np.ndarray] = {}  # split part -> examples per shard
        self.timestamp_max = None
        for shard in range(self.tables.shards):
            counts, newest = shard_split_counts(self.tables, shard, self.schema, self.split)
            for part, n in counts.items():
                self.part_counts.setdefault(part, np.zeros(self.tables.shards, dtype=np.int64))[shard] = n
            if newest is not None:
                self.timestamp_max = max(newest, self.timestamp_max if self.timestamp_max is not None else newest)
        first = next((shard for shard in range(self.tables.shards)
                      if any(counts[shard] for counts in self.part_counts.values())), None)
        examples = None if first is None else self.read(first)
        self.feature_names = examples.feature_names if examples is not None else []
        self.dense_names = examples.dense_names if examples is not None else []

    def read(self, shard: int) -> Examples | None:
        examples = read_shard(self.tables, shard, self.schema, self.split, self.history_length)
        return None if examples is None else examples.keep_dense(self.dense)

    def keep_dense(self, names: list[str] | None) -> ShardedExamples:
        self.dense = names
        if names is not None:
            self.dense_names = list(names)
        return self

    def split_part(self, part: int) -> ShardedPart:
        return ShardedPart(self, part)


@dataclass
class ShardedPart:
    """One split part (train, valid or test) of sharded examples."""

    source: ShardedExamples
    part: int

    @property
    def counts(self) -> np.ndarray:
        return self.source.part_counts.get(self.part, np.zeros(self.source.tables.shards, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.counts.sum())

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        return [shard for shard in range(rank, self.source.tables.shards, world_size) if self.counts[shard]]

    @staticmethod
    def local_batch_size(global_batch_size: int, world_size: int) -> int:
        """Every rank's batch size: the same on all of them (a row-wise sharded table's backward
        all-gathers the ranks' batches, which must be equal)."""
        return max(1, global_batch_size // world_size)

    def rank_counts(self, world_size: int) -> list[int]:
        return [int(self.counts[self.shards_of(r, world_size)].sum()) for r in range(world_size)]

    def steps(self, global_batch_size: int, world_size: int) -> int:
        """Steps per epoch: the fewest that any rank's examples fill (the last batch may be short)."""
        size = self.local_batch_size(global_batch_size, world_size)
        return min(-(-n // size) for n in self.rank_counts(world_size))

    def batch_sizes(self, global_batch_size: int, world_size: int) -> np.ndarray:
        """Every step's batch size, the same on every rank: full ones, then the last one as short
        as the rank with the fewest examples left needs."""
        size = self.local_batch_size(global_batch_size, world_size)
        steps = self.steps(global_batch_size, world_size)
        sizes = np.full(steps, size, dtype=np.int64)
        if steps:
            sizes[-1] = min(min(n - (steps - 1) * size for n in self.rank_counts(world_size)), size)
        return sizes

    def examples(self, shard: int) -> Examples:
        examples = self.source.read(shard)
        return examples.subset(np.flatnonzero(examples.split == self.part))

    def in_order(self, rank: int = 0, world_size: int = 1) -> Iterator[Examples]:
        """This rank's examples of the part, one shard at a time, in shard order."""
        for shard in self.shards_of(rank, world_size):
            yield self.examples(shard)

    def distinct_ids(self, names: list[str]) -> dict[str, np.ndarray]:
        """The raw ids of each feature in ``names`` in this part (one pass over the shards)."""
        seen: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for examples in self.in_order():
            for name in names:
                seen[name].append(np.unique(examples.feature_values[name]))
        return {name: np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
                for name, ids in seen.items()}

    def batches(self, feature_names: list[str], global_batch_size: int, *, shuffle: bool, seed: int = 0,
                epoch: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0,
                history_length: int = 0) -> Iterator[Batch]:
        """This rank's batches of one epoch through the shuffle buffer, from ``start_step`` on."""
        sizes = self.batch_sizes(global_batch_size, world_size)
        rng = np.random.default_rng([seed, epoch, rank])
        shards = self.shards_of(rank, world_size)
        waiting = list(rng.permutation(shards)) if shuffle else list(shards)
        open_shards: dict[int, Examples] = {}
        undrawn: dict[int, int] = {}  # open shard -> its examples still in the pool
        pool = np.zeros((0, 2), dtype=np.int64)  # (shard, example index) pairs not drawn yet
        for step, size in enumerate(sizes.tolist()):
            while len(pool) < size and waiting or len(open_shards) < self.source.buffer_shards and waiting:
                shard = int(waiting.pop(0))
                open_shards[shard] = self.examples(shard)
                undrawn[shard] = len(open_shards[shard])
                pairs = np.stack([np.full(len(open_shards[shard]), shard), np.arange(len(open_shards[shard]))], 1)
                pool = np.concatenate([pool, pairs])
                if shuffle:
                    pool = pool[rng.permutation(len(pool))]
            drawn, pool = pool[:size], pool[size:]
            if step >= start_step:
                pieces = [(open_shards[int(shard)], drawn[drawn[:, 0] == shard, 1])
                          for shard in dict.fromkeys(drawn[:, 0].tolist())]
                yield make_batch_from_pieces(pieces, feature_names, history_length)
            for shard, count in zip(*np.unique(drawn[:, 0], return_counts=True)):
                undrawn[int(shard)] -= int(count)
                if not undrawn[int(shard)]:
                    del open_shards[int(shard)], undrawn[int(shard)]  # every example drawn: its memory goes
