"""The Feast repository on a real local store: ML-100K loaded, joined point-in-time, served."""

import numpy as np
import pandas as pd
import pytest

from features.load import load_into_store, offline_tables, running_state
from features.store import StoreError, open_store
from features.training import examples_from_store
from recsys.data.schema import DataError


@pytest.fixture(scope="module")
def loaded_store(ml100k, tmp_path_factory):
    directory = tmp_path_factory.mktemp("plexrec-data")
    frame, schema = ml100k
    store = open_store("local", directory)
    counts = load_into_store(store, frame, schema, directory, history_length=200)
    return store, directory, counts


def test_running_state_is_what_was_known_at_each_second():
    keys = np.array([1, 1, 1, 2])
    seconds = np.array([10, 10, 20, 5])
    state = running_state(keys, seconds, np.array([7, 8, 9, 4]), history_length=2)
    assert state["key"].tolist() == [1, 1, 2]
    assert state["interaction_count"].tolist() == [2, 3, 1]  # one row per second: both events of 10
    assert state["history_item_ids"].tolist() == [[7, 8], [8, 9], [4]]  # capped at 2, most recent kept


def test_load_writes_every_view_and_the_online_store(loaded_store):
    store, _, counts = loaded_store
    assert counts["user_profile"] == 943 and counts["item_profile"] == 1682
    assert counts["interactions"] == 100_000
    online = store.get_online_features(
        features=["user_profile:gender", "user_history:interaction_count", "user_history:history_item_ids"],
        entity_rows=[{"user_id": 1}, {"user_id": 424242}]).to_dict()
    assert online["gender"] == ["M", None]  # an unknown user reads as missing, not an error
    assert online["interaction_count"][0] == 272  # every rating of user 1
    assert len(online["history_item_ids"][0]) == 200


def test_point_in_time_examples_equal_the_direct_loader(loaded_store, ml100k_examples):
    store, directory, _ = loaded_store
    from_store = examples_from_store(store, directory)
    direct = ml100k_examples
    assert len(from_store) == len(direct) == 100_000
    for name in direct.feature_names:
        assert np.array_equal(from_store.feature_values[name], direct.feature_values[name]), name
        assert np.array_equal(from_store.feature_offsets[name], direct.feature_offsets[name]), name
    assert np.array_equal(from_store.label, direct.label) and np.array_equal(from_store.split, direct.split)
    np.testing.assert_array_equal(from_store.dense, direct.dense)
    for i in range(len(direct)):
        assert np.array_equal(from_store.history(i, 200), direct.history(i, 200)), i


def test_a_data_set_without_a_declared_column_is_named(ml100k):
    frame, schema = ml100k
    with pytest.raises(DataError, match="column 'occupation' is required by the feature definitions"):
        offline_tables(frame.drop(columns=["occupation"]), schema, 200)


def test_unknown_profile_and_missing_redis_address_are_explained(tmp_path, monkeypatch):
    monkeypatch.delenv("PLEXREC_REDIS_URL", raising=False)
    with pytest.raises(StoreError, match="unknown store profile 'mongo'"):
        open_store("mongo", tmp_path)
    with pytest.raises(StoreError, match="needs a Redis address"):
        open_store("redis", tmp_path)


def test_interactions_table_keeps_the_label_events(loaded_store, ml100k):
    _, directory, _ = loaded_store
    events = pd.read_parquet(directory / "offline" / "interactions.parquet")
    frame, _ = ml100k
    assert sorted(events["rating"].value_counts().to_dict().items()) == \
        sorted(frame["rating"].value_counts().to_dict().items())
