"""Shared fixtures: the real ML-100K files, small slices of them, one process group."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.config import PROJECT_ROOT, FeatureConfig, RunConfig
from features.examples import build_examples
from features.movielens import load_movielens, movielens_schema, movielens_tables
from features.schema import DatasetSchema
from features.datasets import read_tables

ML100K = PROJECT_ROOT / "data" / "ml-100k"
KUAIRAND_SCHEMA = PROJECT_ROOT / "data" / "kuairand-pure" / "schema.yaml"
SYNTHETIC_SCHEMA = PROJECT_ROOT / "data" / "synthetic" / "schema.yaml"


@pytest.fixture(scope="session")
def ml100k():
    """(frame, schema) of the whole real data set."""
    return load_movielens(ML100K)


@pytest.fixture(scope="session")
def ml100k_tables():
    """The DatasetTables of ML-100K: ratings, the 943 users and the 1,682 movies."""
    return movielens_tables(movielens_schema())


@pytest.fixture(scope="session")
def kuairand_tables():
    """The KuaiRand-Pure sample's tables: 228,329 impressions, user and video tables."""
    return read_tables(DatasetSchema.from_yaml(KUAIRAND_SCHEMA))


@pytest.fixture(scope="session")
def kuairand_small(kuairand_tables):
    """KuaiRand impressions of users with id < 400 (about 3,500 rows), the whole catalogue."""
    interactions = kuairand_tables.interactions
    return kuairand_tables.with_interactions(interactions[interactions.user_id < 400])


@pytest.fixture(scope="session")
def ml100k_examples(ml100k):
    frame, schema = ml100k
    return build_examples(frame, schema)


@pytest.fixture(scope="session")
def small_examples(ml100k):
    """Examples of the first 120 users: real data, quick to train on."""
    frame, schema = ml100k
    return build_examples(frame[frame.user_id <= 120], schema)


# configs/ml100k.yaml's features
ML_FEATURES = [("user_id", 2), ("item_id", 2), ("age_bucket", 1), ("gender", 1), ("occupation", 1),
               ("zip_prefix", 1), ("genres", 1), ("release_year", 1)]


def small_config(**train) -> RunConfig:
    config = RunConfig()
    config.features = [FeatureConfig(name, probes) for name, probes in ML_FEATURES]
    config.embedding.num_rows = 2000
    config.model.mlp = [32, 16]
    config.train.batch_size = 128
    config.train.epochs = 1
    config.train.checkpoint_every_epoch = False
    for key, value in train.items():
        setattr(config.train, key, value)
    return config.validate()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def broker():
    """The embedded Kafka-compatible broker (tansu, memory storage) on a free loopback port."""
    from features.broker import embedded_broker

    with embedded_broker() as bootstrap:
        yield bootstrap
