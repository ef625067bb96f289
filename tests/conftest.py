"""Shared fixtures: the real ML-100K files, small slices of them, one process group."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.config import PROJECT_ROOT, RunConfig
from recsys.data.examples import build_examples
from recsys.data.movielens import load_movielens

ML100K = PROJECT_ROOT / "data" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k():
    """(frame, schema) of the whole real data set."""
    return load_movielens(ML100K)


@pytest.fixture(scope="session")
def ml100k_examples(ml100k):
    frame, schema = ml100k
    return build_examples(frame, schema)


@pytest.fixture(scope="session")
def small_examples(ml100k):
    """Examples of the first 120 users: real data, quick to train on."""
    frame, schema = ml100k
    return build_examples(frame[frame.user_id <= 120], schema)


def small_config(**train) -> RunConfig:
    config = RunConfig()
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
