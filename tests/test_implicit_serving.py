"""A model trained on sampled negatives serves the scores it computes offline (issue 22, item 4):
negatives only shape training, serving is unchanged. A slice of ML-100K with the implicit schema
(every rating a positive, two popularity-sampled negatives each) is loaded into a real local
store; a small DARE ranker trains from that store (data.source feast: the store's SQL draws the
negatives); the real gRPC server scores users and candidates on loopback. The reference is the
exported model on the features the online store holds (as tests/test_served_scores.py) and the
direct loader's examples (as tests/test_serving.py). And nothing sampled reaches the store: online
histories and counters are made of the ratings alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.load import load_into_store
from features.online import OnlineFeatures
from features.schema import DatasetSchema
from features.store import open_store
from features.datasets import read_tables
from serving.client import ScoringClient
from serving.server import ServeConfig, serving_in_background

from .conftest import small_config
from .test_served_scores import model_scores
from .test_serving import offline_scores

ROOT = Path(__file__).resolve().parents[1]
IMPLICIT_SCHEMA = ROOT / "data" / "ml-100k" / "schema-implicit.yaml"
HISTORY = 200
LAST_USER = 60  # a slice of the users (6,584 ratings), to keep it quick


@pytest.fixture(scope="module")
def implicit_slice(tmp_path_factory):
    """(tables of users 1..60, their store's directory, the exported model's directory, the run's result)."""
    from recsys.train import Trainer

    schema = DatasetSchema.from_yaml(IMPLICIT_SCHEMA)
    tables = read_tables(schema)
    tables = tables.with_interactions(tables.interactions[tables.interactions[schema.user] <= LAST_USER])
    store_dir = tmp_path_factory.mktemp("implicit-serving-store")
    load_into_store(open_store("local", store_dir), tables, store_dir, history_length=HISTORY)
    config = small_config(epochs=1)
    config.data.schema, config.data.source, config.data.store_dir = str(IMPLICIT_SCHEMA), "feast", str(store_dir)
    # DARE reads the last 50 of the store's 200 history items (serving cuts the online history alike)
    config.sequence.mode, config.sequence.top_k, config.data.max_history = "dare", 16, 50
    config.train.batch_size = 256
    result = Trainer(config.validate(), out_dir=tmp_path_factory.mktemp("implicit-serving-run")).fit(progress=False)
    return tables, store_dir, Path(result["model_dir"]), result


def test_a_model_trained_on_sampled_negatives_serves_its_offline_scores(implicit_slice):
    tables, store_dir, model_dir, result = implicit_slice
    schema, ratings = tables.schema, tables.interactions
    # it did train on sampled negatives: each test positive (the last 5 of each user) came with ~2
    test_positives = 5 * ratings[schema.user].nunique()
    assert 2.9 * test_positives < result["test"]["examples"] <= 3 * test_positives

    online = OnlineFeatures(open_store("local", store_dir))
    users = [1, 13, 19, 42]  # 272, 636, 20 and 183 ratings: online histories cut to 200 and not
    config = ServeConfig(model_dir=str(model_dir.parent), port=0, item_cache_seconds=0.0)
    with serving_in_background(config, open_store("local", store_dir)) as running, \
            ScoringClient(f"127.0.0.1:{running.port}") as scoring:
        model = running.watcher.current
        assert model.version == model_dir.name
        for user in users:
            rated = ratings.loc[ratings[schema.user] == user, schema.item].astype(int).tolist()
            unrated = sorted(set(ratings[schema.item].astype(int)) - set(rated))[::40]
            # rated items (in the history), items the user never rated (what negatives are drawn
            # from), an item of the catalogue nobody in the slice rated, and an unknown one
            unknown_to_slice = min(set(tables.items[schema.item].astype(int)) - set(ratings[schema.item].astype(int)))
            candidates = [*rated[-5:], *unrated, unknown_to_slice, 10**9]
            scores, version = scoring.score(user, candidates)
            assert version == model_dir.name
            served = np.array(scores)
            np.testing.assert_allclose(served, model_scores(model, online, user, candidates), rtol=0, atol=1e-5)
            np.testing.assert_allclose(served, offline_scores(tables, model_dir, user, candidates), rtol=0, atol=1e-5)
            assert np.ptp(served) > 1e-3  # the items are told apart, not one constant


def test_the_store_holds_no_sampled_negative(implicit_slice):
    """Negatives are drawn when examples are built; they are never behaviours: each user's online
    history is their own ratings, each counter counts ratings, the offline log is the ratings."""
    tables, store_dir, _, _ = implicit_slice
    schema, ratings = tables.schema, tables.interactions
    online = OnlineFeatures(open_store("local", store_dir))
    offline = pd.read_parquet(store_dir / "offline" / "interactions.parquet")
    assert len(offline) == len(ratings)

    user_ids = sorted(ratings[schema.user].astype(int).unique())
    for user, features in zip(user_ids, online.users(user_ids)):
        rated = ratings.loc[ratings[schema.user] == user].sort_values(schema.timestamp, kind="stable")
        items = rated[schema.item].astype(int).tolist()
        assert features.interaction_count == len(items), user
        assert len(features.history_item_ids) == min(len(items), HISTORY), user
        history = Counter(features.history_item_ids)
        assert not history - Counter(items), f"user {user}: items in the history the user never rated"
        if len(items) <= HISTORY:
            assert history == Counter(items), user
        # the newest rating is the history's newest entry (ties of the last instant aside)
        newest = rated[rated[schema.timestamp] == rated[schema.timestamp].max()][schema.item].astype(int)
        assert features.history_item_ids[-1] in set(newest.tolist()), user

    item_ids = sorted(tables.items[schema.item].astype(int).tolist())
    counts = ratings[schema.item].astype(int).value_counts()
    served = online.items(item_ids)
    assert {i: served[i].interaction_count for i in item_ids} == {i: int(counts.get(i, 0)) for i in item_ids}
