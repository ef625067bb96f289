"""The fast inference path (recsys/inference.py, serving/inputs.py InputBuilder) against the exported
model's eager forward (TorchRec Ranker on training's pandas rows): the same scores to 1e-5 on every
shipped schema, sequence mode and embedding kind, and the same raw ids and dense values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from features.online import ItemFeatures, UserFeatures
from recsys.config import FeatureConfig, RunConfig
from recsys.data.batching import model_inputs
from features.examples import DERIVED_DENSE, build_examples
from features.schema import CATEGORY_FEATURE, DatasetSchema, first_value
from features.tables import DatasetTables
from features.datasets import read_tables
from recsys.model import build_ranker
from serving.inputs import InputBuilder, model_batch
from serving.item_vectors import ItemVectorCache
from serving.model import inference_ranker

from .conftest import SYNTHETIC_SCHEMA


def cells(row) -> dict:
    """A table row as the online store gives a profile: missing values left out."""
    return {k: v for k, v in row.items() if isinstance(v, (list, np.ndarray)) or not pd.isna(v)}


def online_rows(tables: DatasetTables, users: int, rng) -> tuple[list[UserFeatures], dict[int, ItemFeatures]]:
    """Users and items of the data set as the online store reads them: real profiles (the users and
    items tables), real histories of every length (0, short, longer than the model reads), counts."""
    schema = tables.schema
    items = {}
    by_item = tables.items.set_index(schema.item, drop=False) if len(tables.items.columns) > 1 else None
    catalogue = tables.interactions[schema.item].drop_duplicates().astype(int).tolist()
    for item_id in catalogue:
        profile = cells({c: by_item.at[item_id, c] for c in schema.items.columns}) if by_item is not None else {}
        category = None
        if schema.category:
            source = by_item.at[item_id, schema.category] if by_item is not None and schema.category in by_item \
                else tables.interactions.loc[tables.interactions[schema.item] == item_id, schema.category].iloc[0]
            category = first_value(source, schema.multi_valued.get(schema.category))
        items[item_id] = ItemFeatures(item_id=item_id, profile=profile, category=category,
                                      interaction_count=int(rng.integers(0, 500)))
    by_user = tables.users.set_index(schema.user, drop=False) if len(tables.users.columns) > 1 else None
    frame = tables.interactions.sort_values(schema.timestamp, kind="stable")
    ids = frame[schema.user].drop_duplicates().astype(int).tolist()[:users]
    online = []
    for n, user_id in enumerate(ids):
        history = frame.loc[frame[schema.user] == user_id, schema.item].astype(int).tolist()
        history = history[:[0, 3, len(history)][n % 3]]  # empty, short and whole histories
        profile = cells({c: by_user.at[user_id, c] for c in schema.users.columns}) if by_user is not None else {}
        context = {}
        if schema.context.columns:
            row = frame[frame[schema.user] == user_id].iloc[-1]
            context = cells({c: row[c] for c in schema.context.columns})
            context = {c: str(v) if c in schema.context.categorical else v for c, v in context.items()}
        online.append(UserFeatures(user_id=user_id, profile=profile, history_item_ids=history,
                                   history_timestamps=list(range(len(history))), interaction_count=len(history),
                                   context=context))
    online.append(UserFeatures(user_id=10**12))  # a user the store does not know
    return online, items


def random_ranker(tables: DatasetTables, mode: str, kind: str = "unified", max_history: int = 40,
                  learn_logit_scale: bool = False):
    """A ranker of every feature of the schema, randomly initialised (the paths must agree for any
    weights), scaled up so that its scores spread."""
    schema = tables.schema
    examples = build_examples(tables.joined(), schema)
    config = RunConfig()
    names = [n for n in examples.feature_names if mode != "none" or n != CATEGORY_FEATURE]
    config.features = [FeatureConfig(n, 2 if n in ("user_id", "item_id") else 1) for n in names]
    config.embedding.kind, config.embedding.num_rows, config.embedding.dim = kind, 3000, 8
    config.sequence.mode, config.sequence.top_k, config.data.max_history = mode, 6, max_history
    config.sequence.learn_logit_scale = learn_logit_scale
    config.model.mlp, config.model.cross_layers = [16, 8], 1
    config.validate()
    vocabularies = {n: torch.from_numpy(np.unique(examples.feature_values[n])) for n in names}
    torch.manual_seed(0)
    model = build_ranker(config, vocabularies, len(examples.dense_names)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.4)
    return model, config, examples.dense_names


def both_paths(tables, model, config, dense_names, users, items, share: bool = True, model_version=None):
    schema = tables.schema
    features, history_length = model_inputs(config, schema.categorical_features)
    fast = inference_ranker(model, schema, dense_names)
    builder = InputBuilder(schema, fast, history_length, model_version=model_version)
    requests = [(user, [items[i] for i in list(items)[n * 7 % len(items):][:9]]) for n, user in enumerate(users)]
    history = {i: items[i] for i in items}
    with torch.inference_mode():
        inputs = builder.batch(requests, history)
        fast_scores = torch.sigmoid(fast(inputs.user_part, inputs.item_columns, inputs.item_dense, inputs.row_group,
                                         inputs.history, inputs.item_attention, inputs.item_representation))
        batch, shared = model_batch(schema, requests, history, features, history_length,
                                    share and config.sequence.mode in ("dare", "coupled"), dense_names=dense_names)
        eager = torch.sigmoid(model(batch.dense, batch.sparse, shared))
    return fast_scores.numpy(), eager.numpy(), builder, requests, (batch, shared)


@pytest.fixture(scope="module")
def kuairand_slice(kuairand_tables):
    interactions = kuairand_tables.interactions
    return kuairand_tables.with_interactions(interactions[interactions.user_id < 60])


@pytest.fixture(scope="module")
def ml100k_slice(ml100k_tables):
    interactions = ml100k_tables.interactions
    return ml100k_tables.with_interactions(interactions[interactions.user_id <= 40])


@pytest.fixture(scope="module")
def synthetic_slice():
    tables = read_tables(DatasetSchema.from_yaml(SYNTHETIC_SCHEMA), {"num_users": 30, "items_per_category": 10, "targets_per_user": 10, "recent_window": 10, "relevant_max": 4, "min_history": 60, "max_history": 90})
    return tables


SCHEMAS = ["ml100k_slice", "kuairand_slice", "synthetic_slice"]


@pytest.mark.parametrize("schema_fixture", SCHEMAS)
@pytest.mark.parametrize("mode", ["none", "mean", "coupled", "dare"])
def test_the_inference_path_scores_as_the_exported_model(schema_fixture, mode, request, rng):
    tables = request.getfixturevalue(schema_fixture)
    model, config, dense_names = random_ranker(tables, mode)
    users, items = online_rows(tables, 12, rng)
    fast, eager, _, _, _ = both_paths(tables, model, config, dense_names, users, items)
    np.testing.assert_allclose(fast, eager, rtol=0, atol=1e-5)
    assert np.ptp(eager) > 0.05  # scores spread: a wrong column or row would show


@pytest.mark.parametrize("mode", ["coupled", "dare"])
def test_the_inference_path_reads_a_learned_logit_scale(mode, ml100k_slice, rng):
    """A learned tau (here 4: the softmax over the kept behaviours sharper than at 1) is served as trained."""
    from recsys.sequence import LOG_SCALE_RATE

    model, config, dense_names = random_ranker(ml100k_slice, mode, learn_logit_scale=True)
    encoder = model.sequence
    with torch.no_grad():
        encoder.log_logit_scale.fill_(math.log(4.0) / LOG_SCALE_RATE)
    assert float(encoder.logit_scale()) == pytest.approx(4.0)
    users, items = online_rows(ml100k_slice, 12, rng)
    fast, eager, _, _, _ = both_paths(ml100k_slice, model, config, dense_names, users, items)
    np.testing.assert_allclose(fast, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["hashed", "full"])
def test_the_inference_path_reads_per_feature_tables_as_the_exported_model(kind, ml100k_slice, rng):
    model, config, dense_names = random_ranker(ml100k_slice, "none", kind)
    users, items = online_rows(ml100k_slice, 8, rng)
    fast, eager, _, _, _ = both_paths(ml100k_slice, model, config, dense_names, users, items)
    np.testing.assert_allclose(fast, eager, rtol=0, atol=1e-5)
    assert np.ptp(eager) > 0.05


@pytest.mark.parametrize("schema_fixture", SCHEMAS)
def test_serving_reads_the_raw_ids_and_dense_values_training_reads(schema_fixture, request, rng):
    """Per feature, the ids and dense values the fast builder reads of each row equal the KJT and dense
    tensor training's conversion (pandas rows through examples_from_feature_rows) makes of them."""
    tables = request.getfixturevalue(schema_fixture)
    model, config, dense_names = random_ranker(tables, "dare")
    users, items = online_rows(tables, 9, rng)
    _, _, builder, requests, (batch, _) = both_paths(tables, model, config, dense_names, users, items)
    rows_users = [user for user, candidates in requests for _ in candidates]
    rows_items = [item for _, candidates in requests for item in candidates]
    kjt = batch.sparse.to_dict()
    for readers, entities in ((builder.user_readers, rows_users), (builder.item_readers, rows_items)):
        ids = builder._ids(readers, entities)
        for name, (values, lengths) in ids.items():
            assert torch.equal(values, kjt[name].values()), name
            assert torch.equal(lengths, kjt[name].lengths().long()), name
    checked = {name for name, *_ in builder.user_readers + builder.item_readers}
    assert checked == {f.name for f in config.features}
    dense = torch.cat([builder._dense(builder.user_dense, rows_users), builder._dense(builder.item_dense, rows_items)],
                      dim=1)
    order = [dense_names.index(n) for n in builder.ranker.user_dense_names + builder.ranker.item_dense_names]
    assert torch.equal(dense, batch.dense[:, order])
    assert set(dense_names) >= set(DERIVED_DENSE)


def test_the_inference_path_agrees_for_many_calls_in_one_batch(ml100k_slice, rng):
    """Calls of different users and lengths in one batch: each row reads its own call's user and history
    (the eager path given a history per row, no sharing)."""
    model, config, dense_names = random_ranker(ml100k_slice, "dare", max_history=25)
    users, items = online_rows(ml100k_slice, 10, rng)
    fast, eager, *_ = both_paths(ml100k_slice, model, config, dense_names, users, items, share=False)
    np.testing.assert_allclose(fast, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "dare"])
def test_published_vectors_never_replace_the_models_own(mode, ml100k_slice, rng):
    """Serving computes every item's A(t) and R(t) from the model and the item's features: vectors
    the store published for it, the served version's own or another's, scaled or not, are not read
    (a vector published from another profile than the online one would score the item wrongly)."""
    import dataclasses

    from features.examples import category_id
    from recsys.item_embeddings import item_embeddings

    model, config, dense_names = random_ranker(ml100k_slice, mode)
    users, items = online_rows(ml100k_slice, 9, rng)
    ids = np.array(list(items))
    representation, attention = item_embeddings(model, ids, np.array([category_id(items[i].category) for i in ids]))

    def published(version: str, scale: float) -> dict[int, ItemFeatures]:
        return {int(i): dataclasses.replace(items[int(i)], model_version=version, representation_embedding=list(r * scale),
                                            attention_embedding=list(a * scale), embeddings_valid_for=version)
                for i, r, a in zip(ids, representation, attention)}

    for version, scale in (("v1", 1.0), ("v1", -2.0), ("v0", -2.0), (None, 1.0)):
        fast, eager, builder, *_ = both_paths(ml100k_slice, model, config, dense_names, users,
                                              published(version, scale), model_version="v1")
        np.testing.assert_allclose(fast, eager, rtol=0, atol=1e-5)


# --- the item vector cache ---


def counting_cache(max_items: int):
    computed = []

    def compute(items):
        computed.extend(item.item_id for item in items)
        return [torch.tensor([[float(item.item_id), float(item.interaction_count)] for item in items])]

    return ItemVectorCache(compute, [2], max_items), computed


def test_item_vectors_are_computed_once_per_item_and_again_when_its_features_change():
    cache, computed = counting_cache(100)
    items = [ItemFeatures(item_id=i, interaction_count=i) for i in range(5)]
    rows = cache.slots(items + [items[2], items[2]])
    assert computed == [0, 1, 2, 3, 4]  # a repeated item: computed once
    assert cache.parts[0][rows][:, 0].tolist() == [0, 1, 2, 3, 4, 2, 2]
    cache.slots(items[::-1])
    assert computed == [0, 1, 2, 3, 4]
    reread = ItemFeatures(item_id=3, interaction_count=99)  # the store read the item again: a new object
    rows = cache.slots([reread, items[1]])
    assert computed[-1] == 3 and cache.parts[0][rows].tolist() == [[3.0, 99.0], [1.0, 1.0]]


def test_item_vectors_are_bounded_and_evict_the_least_recently_used():
    cache, computed = counting_cache(4)
    items = {i: ItemFeatures(item_id=i) for i in range(10)}
    cache.slots([items[i] for i in (0, 1, 2, 3)])
    cache.slots([items[0]])  # 0 is now the most recent: 1 goes first
    rows = cache.slots([items[4], items[0]])
    assert len(cache) == 4 and cache.replaced == 1
    assert cache.parts[0][rows][:, 0].tolist() == [4.0, 0.0]
    computed.clear()
    cache.slots([items[1]])
    assert computed == [1]  # evicted, so computed again
    with pytest.raises(ValueError, match="distinct items"):
        cache.slots([items[i] for i in range(5)])


def test_item_vectors_under_random_lookups_read_each_items_own_features():
    """2,000 random lookups (up to 8 of 40 items, an item's features sometimes read again as a new object)
    through a cache of 16: every row read holds the vectors of the very object looked up, an item looked up
    again with the same object is not recomputed while it was used in the last 2 lookups (16 rows hold
    them), and the cache never passes its bound."""
    import random

    rng = random.Random(0)
    cache, computed = counting_cache(16)
    objects = {i: ItemFeatures(item_id=i, interaction_count=0) for i in range(40)}
    recent: list[set[int]] = [set(), set()]  # ids of the last two lookups, with the objects then current
    for step in range(1, 2001):
        if rng.random() < 0.1:
            changed = rng.randrange(40)
            objects[changed] = ItemFeatures(item_id=changed, interaction_count=step)
            for ids in recent:
                ids.discard(changed)
        ids = rng.sample(range(40), rng.randrange(1, 9))
        lookup = [objects[i] for i in ids] + [objects[ids[0]]]  # one repeated
        computed.clear()
        rows = cache.slots(lookup)
        assert cache.parts[0][rows].tolist() == [[i.item_id, i.interaction_count] for i in lookup]
        assert not set(computed) & (recent[0] | recent[1])
        assert len(computed) == len(set(computed)) and len(cache) <= 16
        recent = [recent[1], set(ids)]
    assert cache.replaced > 100


def test_an_item_read_twice_in_one_lookup_has_one_row():
    """A cached and a newer object of one item in the same lookup (the store read it again mid-batch):
    one row for both, the newer object's vectors, computed once."""
    cache, computed = counting_cache(10)
    old, new = ItemFeatures(item_id=7, interaction_count=1), ItemFeatures(item_id=7, interaction_count=2)
    cache.slots([old])
    computed.clear()
    rows = cache.slots([old, new, old])
    assert computed == [7] and len(set(rows.tolist())) == 1 and len(cache) == 1
    assert cache.parts[0][rows[0]].tolist() == [7.0, 2.0]


def test_top_k_mixing_puts_the_training_paths_top_k_softmax_weights_in_place():
    from recsys.inference import top_k_mixing
    from recsys.sequence import padded_top_k_softmax

    generator = torch.Generator().manual_seed(0)
    # few distinct values: many ties, also across the k-th place
    for scores in (torch.randint(0, 4, (50, 30), generator=generator).float(), torch.randn(20, 90, generator=generator),
                   torch.randn(5, 3, generator=generator)):
        index, weights, valid = padded_top_k_softmax(scores, 8)
        expected = torch.zeros_like(scores).scatter_(1, index, torch.where(valid, weights, 0.0))
        torch.testing.assert_close(top_k_mixing(scores, 8), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["unified", "hashed", "full"])
def test_a_few_values_embed_as_many_do(kind, ml100k_slice, rng):
    """The Python-int path for a few values (one user) gives the tensor path's columns, from ids
    given as tensors or as lists (what InputBuilder gives the user side)."""
    model, config, dense_names = random_ranker(ml100k_slice, "none", kind)
    users, items = online_rows(ml100k_slice, 6, rng)
    builder = InputBuilder(ml100k_slice.schema, inference_ranker(model, ml100k_slice.schema, dense_names), 0)
    ranker = builder.ranker
    for readers, lookups, entities in ((builder.user_readers, ranker.user_lookups, users),
                                       (builder.item_readers, ranker.item_lookups, list(items.values())[:5])):
        ids = builder._ids(readers, entities)
        few = ranker._embed_few(lookups, ids, len(entities))
        many = ranker._embed_many(lookups, ids, len(entities))
        torch.testing.assert_close(few, many, rtol=0, atol=1e-6)
        as_lists = builder._ids(readers, entities, as_lists=True)
        assert all(isinstance(part, list) for jagged in as_lists.values() for part in jagged)
        for embed in (ranker._embed_few, ranker._embed_many):
            torch.testing.assert_close(embed(lookups, as_lists, len(entities)), many, rtol=0, atol=0)
