"""Training examples streamed from the store's user shards: every example once per epoch, each with
the features and history of the in-memory examples, the same steps on every rank, and a run that
trains and evaluates from them."""

import dataclasses
from collections import Counter

import numpy as np
import pytest

from features.example_tables import ExampleTables, build_example_tables
from features.load import load_into_store
from features.store import open_store
from features.training import examples_from_store
from recsys.data.batching import HISTORY_ITEMS
from recsys.data.example_stream import ShardedExamples
from features.examples import TEST, TRAIN, VALID, SplitRule
from recsys.train import Trainer
from tests.conftest import small_config

HISTORY = 30


@pytest.fixture(scope="module")
def sharded(ml100k_tables, tmp_path_factory):
    """ML-100K loaded into a store, its examples built in memory and as about 14 user shards."""
    directory = tmp_path_factory.mktemp("store")
    ratings = ml100k_tables.interactions
    tables = ml100k_tables.with_interactions(ratings[ratings["user_id"] <= 300])
    load_into_store(open_store("local", directory), tables, directory, history_length=HISTORY)
    split = SplitRule()
    in_memory = examples_from_store(open_store("local", directory), directory, split=split)
    built = build_example_tables(directory / "offline", tables.schema, directory / "shards", split=split,
                                 shard_examples=2500, min_shards=2)
    return directory, in_memory, ShardedExamples(ExampleTables.open(directory / "shards"), tables.schema, split,
                                                 HISTORY, buffer_shards=2), built


def by_key(examples):
    """(user, item) -> example index (a MovieLens user rates an item once)."""
    return {(int(u), int(i)): n for n, (u, i) in enumerate(zip(examples.user_id, examples.item_id))}


def batch_rows(batch):
    """(user, item, history) of every example of a batch, from its KJT."""
    features = batch.sparse.to_dict()
    items = features["item_id"].values().numpy()
    histories = np.split(features[HISTORY_ITEMS].values().numpy(),
                         np.cumsum(features[HISTORY_ITEMS].lengths().numpy())[:-1])
    return [(int(u), int(i), h.tolist()) for u, i, h in zip(batch.user_ids.numpy(), items, histories)]


def test_the_shards_hold_every_example_once_split_as_in_memory(sharded):
    _, in_memory, streamed, built = sharded
    assert built.shards >= 12 and built.examples == len(in_memory)
    for part in (TRAIN, VALID, TEST):
        assert len(streamed.split_part(part)) == int((in_memory.split == part).sum())
    assert streamed.timestamp_max == int(in_memory.timestamp.max())


def test_an_epoch_streams_every_training_example_once_with_its_history(sharded):
    _, in_memory, streamed, _ = sharded
    train = in_memory.split_part(TRAIN)
    index = by_key(train)
    part = streamed.split_part(TRAIN)
    seen = Counter()
    for batch in part.batches(["user_id", "item_id"], 256, shuffle=True, seed=3, epoch=1,
                              history_length=HISTORY):
        assert len(batch) <= 256
        for user, item, history in batch_rows(batch):
            seen[(user, item)] += 1
            assert history == train.history(index[(user, item)], HISTORY).tolist()
    assert seen == Counter(index.keys())
    assert part.steps(256, 1) == -(-len(train) // 256)


def test_the_order_is_shuffled_across_shards_and_reproducible(sharded):
    _, _, streamed, _ = sharded
    part = streamed.split_part(TRAIN)

    def first_users(epoch):
        return next(iter(part.batches(["user_id", "item_id"], 256, shuffle=True, seed=0, epoch=epoch))).user_ids.numpy()

    assert np.array_equal(first_users(0), first_users(0))
    assert not np.array_equal(first_users(0), first_users(1))
    assert len({int(u) % streamed.tables.shards for u in first_users(0)}) == 2  # two shards mixed in one batch


def test_ranks_read_their_own_shards_and_take_the_same_steps(sharded):
    _, _, streamed, _ = sharded
    part = streamed.split_part(TRAIN)
    ranks = [list(part.batches(["user_id", "item_id"], 256, shuffle=True, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == part.steps(256, 2)
    users = [{int(u) for b in batches for u in b.user_ids.numpy()} for batches in ranks]
    assert not users[0] & users[1]
    assert {u % streamed.tables.shards % 2 for u in users[0]} == {0}


def test_a_run_trains_and_evaluates_from_the_stream(sharded, tmp_path):
    directory, in_memory, _, _ = sharded
    config = small_config(epochs=2)
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, source="feast", store_dir=str(directory), shard_examples=3000, buffer_shards=2))
    trainer = Trainer(config, out_dir=tmp_path / "run")
    assert len(trainer.train_examples) == int((in_memory.split == TRAIN).sum())
    final = trainer.fit(progress=False)
    assert final["test"]["examples"] == int((in_memory.split == TEST).sum())
    assert final["test"]["auc"] > 0.65 and final["data_until"] == int(in_memory.timestamp.max())
