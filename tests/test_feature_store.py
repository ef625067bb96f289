"""The Feast repository on a real local store: every shipped schema loaded, joined point-in-time, served."""

import numpy as np
import pandas as pd
import pytest

from features.load import load_into_store, offline_tables, running_state
from features.store import StoreError, open_store, read_store_meta
from features.training import examples_from_store
from features.examples import CONTEXT, SplitRule, build_examples
from features.schema import DataError, DatasetSchema
from features.tables import tables_from_frame
from features.datasets import read_tables

from .conftest import SYNTHETIC_SCHEMA


@pytest.fixture(scope="module")
def loaded_store(ml100k_tables, tmp_path_factory):
    directory = tmp_path_factory.mktemp("plexrec-data")
    store = open_store("local", directory)
    counts = load_into_store(store, ml100k_tables, directory, history_length=200)
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


def assert_same_examples(from_store, direct, history_length: int) -> None:
    assert len(from_store) == len(direct)
    for name in direct.feature_names:
        assert np.array_equal(from_store.feature_values[name], direct.feature_values[name]), name
        assert np.array_equal(from_store.feature_offsets[name], direct.feature_offsets[name]), name
    assert np.array_equal(from_store.label, direct.label) and np.array_equal(from_store.split, direct.split)
    assert from_store.dense_names == direct.dense_names
    np.testing.assert_allclose(from_store.dense, direct.dense, rtol=1e-6)  # numeric columns are stored as Float32
    for i in range(len(direct)):
        assert np.array_equal(from_store.history(i, history_length), direct.history(i, history_length)), i
    if direct.sequence_categories is not None:
        start, end, _ = from_store.history_ranges(np.arange(len(direct)), history_length)
        d_start, d_end, _ = direct.history_ranges(np.arange(len(direct)), history_length)
        for i in range(0, len(direct), 7):
            assert np.array_equal(from_store.sequence_categories[start[i]:end[i]],
                                  direct.sequence_categories[d_start[i]:d_end[i]]), i


def test_point_in_time_examples_equal_the_direct_loader(loaded_store, ml100k_examples):
    store, directory, _ = loaded_store
    assert_same_examples(examples_from_store(store, directory), ml100k_examples, 200)


def test_point_in_time_examples_equal_the_direct_loader_when_many_events_share_an_instant(ml100k_tables,
                                                                                         tmp_path):
    """ML-100K's times cut to the day (an item rated by several users within one instant, a user's
    many ratings too): no behaviour of an example's own instant counts, on the user's side or the
    item's."""
    interactions = ml100k_tables.interactions
    interactions = interactions[interactions.user_id <= 200].assign(timestamp=lambda f: f.timestamp // 86400 * 86400)
    tables = ml100k_tables.with_interactions(interactions)
    direct = build_examples(tables.joined(), tables.schema)
    shared = pd.Series(direct.item_id).groupby([direct.item_id, direct.timestamp]).transform("size")
    assert (shared > 1).sum() > 1000  # many examples share their item's instant with another
    load_into_store(open_store("local", tmp_path), tables, tmp_path, history_length=50)
    assert_same_examples(examples_from_store(open_store("local", tmp_path), tmp_path), direct, 50)


def test_point_in_time_examples_equal_the_direct_loader_on_kuairand(kuairand_tables, tmp_path):
    """Impressions, ms timestamps, clicked-only histories, user and video tables, a context column."""
    interactions = kuairand_tables.interactions
    tables = kuairand_tables.with_interactions(interactions[interactions.user_id < 3000])
    load_into_store(open_store("local", tmp_path), tables, tmp_path, history_length=30)
    split = SplitRule(kind="time")
    direct = build_examples(tables.joined(), tables.schema, split)
    assert_same_examples(examples_from_store(open_store("local", tmp_path), tmp_path, split=split), direct, 30)
    assert (direct.history_length > 0).mean() > 0.5


def test_point_in_time_examples_equal_the_direct_loader_on_synthetic(tmp_path):
    """A split column with history-only ("context") rows, and long histories."""
    schema = DatasetSchema.from_yaml(SYNTHETIC_SCHEMA)
    tables = read_tables(schema, {"num_users": 12, "min_history": 600, "max_history": 700, "targets_per_user": 20})
    load_into_store(open_store("local", tmp_path), tables, tmp_path, history_length=1000)
    direct = build_examples(tables.joined(), schema)
    examples = direct.subset(np.flatnonzero(direct.split != CONTEXT))  # history-only rows are not joined
    assert_same_examples(examples_from_store(open_store("local", tmp_path), tmp_path), examples, 1000)


@pytest.fixture(scope="module")
def kuairand_store(kuairand_small, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kuairand-store")
    load_into_store(open_store("local", directory), kuairand_small, directory, history_length=20)
    return directory


def test_the_views_follow_the_schema(kuairand_store, kuairand_small):
    store = open_store("local", kuairand_store)
    meta = read_store_meta(kuairand_store)
    assert meta["schema_fingerprint"] == kuairand_small.schema.fingerprint() and meta["history_length"] == 20
    assert meta["types"]["user_active_degree"] == "String" and meta["types"]["author_id"] == "Int64"
    assert meta["types"]["video_duration"] == "Float32" and meta["types"]["tab"] == "Int64"
    fields = {f.name: str(f.dtype) for f in store.get_feature_view("user_profile").features}
    assert len(fields) == 30 and fields["follow_user_num"].startswith("Float32")
    items = {f.name for f in store.get_feature_view("item_profile").features}
    assert items == {"author_id", "video_type", "upload_type", "music_type", "tag", "video_duration", "item_category"}
    online = store.get_online_features(features=["item_profile:tag", "item_profile:item_category"],
                                       entity_rows=[{"item_id": 0}]).to_dict()
    assert online["item_category"][0] == online["tag"][0].split(",")[0]  # a video's first tag


def test_a_data_set_without_a_declared_column_is_named(ml100k):
    frame, schema = ml100k
    with pytest.raises(DataError, match="column 'occupation' is declared in the schema but missing"):
        tables_from_frame(frame.drop(columns=["occupation"]), schema)


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


def test_published_embeddings_read_back_as_the_model_has_them(loaded_store, small_examples, tmp_path):
    import torch

    from features.publish import publish_item_embeddings
    from features.ids import value_to_id
    from recsys.export import load_model
    from recsys.item_embeddings import item_embeddings
    from recsys.train import Trainer
    from tests.conftest import small_config

    store, directory, _ = loaded_store
    config = small_config(epochs=1)
    config.features.append(type(config.features[0])("item_category", 1))
    config.sequence.mode, config.sequence.top_k, config.data.max_history = "dare", 8, 50
    result = Trainer(config.validate(), examples=small_examples, out_dir=tmp_path).fit(progress=False)
    model, manifest = load_model(result["model_dir"])

    items = pd.read_parquet(directory / "offline" / "item_profile.parquet")
    categories = items["item_category"].map(value_to_id).to_numpy()
    representation, attention = item_embeddings(model, items["item_id"].to_numpy(), categories)
    assert representation.shape == (1682, 3 * 8) and attention.shape == (1682, 16)
    publish_item_embeddings(store, items["item_id"].to_numpy(), representation, attention,
                            manifest["model_version"], directory)

    # R(item 50) by hand: its rows under the reference hash, straight from the table
    from recsys.hashing import hash_row_reference
    weight = model.embedding.ebc.embedding_bags["unified"].weight.detach()
    category = value_to_id(items.loc[items["item_id"] == 50, "item_category"].iloc[0])
    rows = [hash_row_reference(50, "item_id", p, len(weight)) for p in range(2)]
    rows.append(hash_row_reference(category, "item_category", 0, len(weight)))
    target = torch.cat([weight[r] for r in rows])
    online = store.get_online_features(
        features=["item_embeddings:representation_embedding", "item_embeddings:attention_embedding",
                  "item_embeddings:model_version"], entity_rows=[{"item_id": 50}]).to_dict()
    np.testing.assert_allclose(online["representation_embedding"][0], target.numpy(), rtol=1e-6)
    row = int(np.flatnonzero(items["item_id"].to_numpy() == 50)[0])
    np.testing.assert_allclose(online["attention_embedding"][0], attention[row], rtol=1e-6)
    assert online["model_version"] == [manifest["model_version"]]
    offline = pd.read_parquet(directory / "offline" / "item_embeddings" / f"{manifest['model_version']}.parquet")
    assert (offline["model_version"] == manifest["model_version"]).sum() == 1682


def test_online_api_gives_cold_start_defaults_and_caches_items(loaded_store):
    from features.online import OnlineFeatures

    store, _, _ = loaded_store
    now = [0.0]
    online = OnlineFeatures(store, ttl_seconds=10, clock=lambda: now[0])
    user = online.user(1)
    assert user.known and user.interaction_count == 272 and len(user.history_item_ids) == 200
    assert user.profile == {"age_bucket": 18, "gender": "M", "occupation": "technician", "zip_prefix": "85"}
    stranger = online.user(10**9)
    assert not stranger.known and stranger.history_item_ids == [] and stranger.profile == {}

    first = online.items([1, 2, 10**9])
    assert first[1].profile["genres"] == ["Animation", "Children's", "Comedy"] and first[10**9].profile == {}
    assert (online.cache_hits, online.cache_misses) == (0, 3)
    online.items([2, 1])
    assert (online.cache_hits, online.cache_misses) == (2, 3)
    now[0] = 11.0  # past the TTL
    online.items([1])
    assert online.cache_misses == 4
    online.use_model_version("v2")  # a new model: cached embeddings are stale
    online.items([1])
    assert online.cache_misses == 5


def test_the_online_api_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, features.online; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture(scope="module")
def redis_url():
    """Debian's redis-server on a free loopback port, for this module's tests only."""
    from features.redis_server import local_redis_server

    with local_redis_server() as url:
        yield url


def test_redis_profile_serves_what_sqlite_serves(ml100k_tables, redis_url, tmp_path, loaded_store):
    from features.online import OnlineFeatures

    ratings = ml100k_tables.interactions
    small = ratings[ratings.user_id <= 40]
    redis_store = open_store("redis", tmp_path, redis_url)
    load_into_store(redis_store, ml100k_tables.with_interactions(small), tmp_path, history_length=200)
    from_redis, from_sqlite = OnlineFeatures(redis_store), OnlineFeatures(loaded_store[0])
    for user_id in (1, 17, 40, 999_999):
        assert from_redis.user(user_id) == from_sqlite.user(user_id)
    items = small.item_id.unique()[:20].tolist()
    assert [i.profile for i in from_redis.items(items).values()] == \
        [i.profile for i in from_sqlite.items(items).values()]


def test_an_unreachable_store_is_named_after_retries(loaded_store):
    from features.online import OnlineFeatures
    from features.broker import free_port

    port = free_port()  # nobody listens there
    store = open_store("redis", loaded_store[1], f"127.0.0.1:{port}")  # the applied registry, a dead Redis
    with pytest.raises(StoreError, match=rf"online store redis at 127.0.0.1:{port} unreachable after 3 tries"):
        OnlineFeatures(store).user(1)


def test_profiles_can_come_from_a_catalogue_wider_than_the_interactions(ml100k_tables):
    frame = ml100k_tables.interactions
    past = frame[frame["timestamp"] < frame["timestamp"].quantile(0.5)]
    tables = offline_tables(ml100k_tables.with_interactions(past), 200)
    assert len(tables["user_profile"]) == 943 and len(tables["item_profile"]) == 1682  # everyone has a profile
    assert len(tables["interactions"]) == len(past) < len(frame)  # interactions only of the past
    assert tables["user_history"]["user_id"].nunique() == past["user_id"].nunique()


def _plexrec(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "plexrec.cli", *args], capture_output=True, text=True, timeout=600)


def test_train_from_the_store_and_publish_on_any_schema(kuairand_store, tmp_path):
    """`plexrec train --set data.source=feast` and `plexrec features publish` on KuaiRand's store."""
    import json

    done = _plexrec("train", "-c", "configs/kuairand.yaml", "--set", "data.source=feast", "--set",
                    f"data.store_dir={kuairand_store}", "--set", "sequence.mode=dare", "--epochs", "1",
                    "-o", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    model_dir = json.loads(done.stdout[done.stdout.index("{"):])["model_dir"]
    manifest = json.loads((tmp_path / "models" / model_dir.rsplit("/", 1)[1] / "manifest.json").read_text())
    assert manifest["schema"]["name"] == "kuairand-pure"
    assert manifest["schema_fingerprint"] == read_store_meta(kuairand_store)["schema_fingerprint"]
    assert "tab" in [f["name"] for f in manifest["features"]]  # every schema feature, context included

    published = _plexrec("features", "publish", "--model-dir", str(tmp_path / "models"), "--data-dir",
                         str(kuairand_store))
    assert published.returncode == 0, published.stderr[-3000:]
    online = open_store("local", kuairand_store).get_online_features(
        features=["item_embeddings:model_version", "item_embeddings:attention_embedding"],
        entity_rows=[{"item_id": 0}, {"item_id": 7582}]).to_dict()
    assert online["model_version"] == [manifest["model_version"]] * 2  # the whole catalogue
    assert len(online["attention_embedding"][0]) == 16


def test_training_from_a_store_of_another_schema_says_so(kuairand_store):
    done = _plexrec("train", "--set", "data.source=feast", "--set", f"data.store_dir={kuairand_store}")
    assert done.returncode != 0
    assert "is not the schema the store" in done.stderr and "kuairand-pure" in done.stderr
    assert "Traceback" not in done.stderr
