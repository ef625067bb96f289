import numpy as np
import pandas as pd
import pytest

from features.errors import ConfigError
from recsys.config import DataConfig
from recsys.data.batching import iterate_batches, make_batch
from features.examples import TEST, TRAIN, VALID, SplitRule, build_examples, take_jagged
from recsys.data.dataset import load_dataset
from features.schema import DataError, DatasetSchema
from features.datasets import read_tables
from features.ids import string_to_id


def test_movielens_files_load_completely(ml100k):
    frame, _ = ml100k
    assert len(frame) == 100_000
    assert frame.user_id.nunique() == 943 and frame.item_id.nunique() == 1682
    assert frame.user_id.value_counts().max() == 737
    toy_story = frame[frame.item_id == 1].iloc[0]
    assert sorted(toy_story.genres) == ["Animation", "Children's", "Comedy"]
    assert toy_story.release_year == 1995
    user_1 = frame[frame.user_id == 1].iloc[0]  # 24, M, technician, 85711
    assert (user_1.age_bucket, user_1.gender, user_1.occupation, user_1.zip_prefix) == (18, "M", "technician", "85")
    assert frame[frame.item_id == 267].release_year.isna().all()  # the one movie without a date


def test_temporal_split_sizes(ml100k_examples):
    ex = ml100k_examples
    assert (ex.split == TEST).sum() == 943 * 5 == 4715
    assert (ex.split == VALID).sum() == 4715
    assert (ex.split == TRAIN).sum() == 100_000 - 2 * 4715
    assert ex.label.mean() == pytest.approx(0.55375)  # share of ratings >= 4 in ML-100K


def test_split_leaks_nothing(ml100k_examples):
    ex = ml100k_examples
    frame = pd.DataFrame({"user": ex.user_id, "t": ex.timestamp, "split": ex.split, "pos": ex.position})
    per_user = frame.groupby(["user", "split"]).agg(t_min=("t", "min"), t_max=("t", "max"),
                                                    p_min=("pos", "min"), p_max=("pos", "max")).unstack()
    # every training interaction is at or before every validation one, which precede test ones
    assert (per_user["t_max"][TRAIN] <= per_user["t_min"][VALID]).all()
    assert (per_user["t_max"][VALID] <= per_user["t_min"][TEST]).all()
    assert (per_user["p_max"][TRAIN] < per_user["p_min"][VALID]).all()
    assert (per_user["p_max"][VALID] < per_user["p_min"][TEST]).all()


def test_history_is_strictly_before_the_target(ml100k_examples):
    ex = ml100k_examples
    for i in np.random.default_rng(0).choice(len(ex), 300, replace=False):
        history = ex.history(i, 10_000)
        # exactly the user's interactions of an earlier second, in time order
        same_user = np.flatnonzero(ex.user_id == ex.user_id[i])
        earlier = same_user[ex.timestamp[same_user] < ex.timestamp[i]]
        assert history.tolist() == ex.item_id[earlier[np.argsort(ex.position[earlier])]].tolist()
        assert ex.history_length[i] <= ex.position[i]
    assert (ex.history_length < ex.position).any()  # same-second ratings exist in ML-100K
    assert len(ex.history(int(np.argmax(ex.history_length)), 200)) == 200  # truncated to the most recent


def test_train_example_histories_hold_no_evaluation_items(ml100k_examples):
    ex = ml100k_examples
    train = np.flatnonzero(ex.split == TRAIN)
    # a training example's history ends before the user's first validation interaction
    first_eval_position = pd.Series(ex.position[ex.split != TRAIN]).groupby(ex.user_id[ex.split != TRAIN]).min()
    assert (ex.position[train] < first_eval_position.loc[ex.user_id[train]].to_numpy()).all()
    assert (ex.history_length[train] <= ex.position[train]).all()


def test_dense_counters_count_strictly_earlier_events():
    frame = pd.DataFrame({"u": [1, 1, 2, 2, 3], "i": [7, 8, 7, 7, 7], "t": [10, 20, 10, 30, 30], "r": [5, 1, 4, 2, 5]})
    schema = DatasetSchema(path="", user="u", item="i", timestamp="t", rating="r")
    ex = build_examples(frame, schema, SplitRule(last_n=1))
    counts = dict(zip(zip(ex.user_id.tolist(), ex.timestamp.tolist()), np.expm1(ex.dense).round().astype(int).tolist()))
    # (user prior count, item 7 or 8 events strictly earlier by anyone)
    assert counts[(1, 10)] == [0, 0] and counts[(2, 10)] == [0, 0]  # same-time events do not count
    assert counts[(1, 20)] == [1, 0] and counts[(2, 30)] == [1, 2] and counts[(3, 30)] == [0, 2]


def _generic_frame(ml100k):
    frame, _ = ml100k
    small = frame[frame.user_id <= 30].copy()
    small["genres"] = small.genres.map("|".join)
    return small


GENERIC_SCHEMA = dict(user="user_id", item="item_id", timestamp="timestamp", rating="rating",
                      users={"categorical": ["age_bucket", "gender", "occupation", "zip_prefix"]},
                      items={"categorical": ["release_year"], "multi_valued": {"genres": "|"}}, category="genres")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_generic_loader_gives_the_movielens_examples(ml100k, tmp_path, suffix):
    import yaml

    generic = _generic_frame(ml100k)
    path = tmp_path / f"interactions{suffix}"
    generic.to_csv(path, index=False) if suffix == ".csv" else generic.to_parquet(path)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({"path": path.name, **GENERIC_SCHEMA}))
    examples, schema = load_dataset(DataConfig(schema=str(tmp_path / "schema.yaml")))

    frame, ml_schema = ml100k
    direct = build_examples(frame[frame.user_id <= 30], ml_schema)
    assert schema.categorical_features == ml_schema.categorical_features
    for name in direct.feature_names:
        assert np.array_equal(examples.feature_values[name], direct.feature_values[name]), name
        assert np.array_equal(examples.feature_offsets[name], direct.feature_offsets[name]), name
    assert np.array_equal(examples.label, direct.label) and np.array_equal(examples.split, direct.split)
    assert np.allclose(examples.dense, direct.dense)
    assert examples.feature_values["gender"][0] in (string_to_id("M"), string_to_id("F"))


def test_a_split_column_is_used_as_it_is(tmp_path):
    frame = pd.DataFrame({"u": [1, 1, 1, 2], "i": [1, 2, 3, 1], "t": [1, 2, 3, 1], "click": [1, 0, 1, 0],
                          "part": ["test", "train", "valid", "train"]})
    ex = build_examples(frame, DatasetSchema(path="", user="u", item="i", timestamp="t", label="click", split="part"))
    assert ex.split.tolist() == [TEST, TRAIN, VALID, TRAIN]
    assert ex.label.tolist() == [1, 0, 1, 0]


def test_missing_declared_column_is_named(ml100k):
    frame, schema = ml100k
    with pytest.raises(DataError, match="column 'occupation' is declared in the schema but missing"):
        build_examples(frame.drop(columns=["occupation"]), schema)


def test_schema_needs_exactly_one_label_source():
    with pytest.raises(ConfigError, match="exactly one of 'rating'"):
        DatasetSchema(path="", user="u", item="i", timestamp="t")


def test_take_jagged_and_batches(small_examples):
    values, offsets = np.array([1, 2, 3, 4, 5, 6]), np.array([0, 2, 2, 5, 6])
    got_values, got_offsets = take_jagged(values, offsets, np.array([2, 1, 0]))
    assert got_values.tolist() == [3, 4, 5, 1, 2] and got_offsets.tolist() == [0, 3, 3, 5]

    names = ["user_id", "genres"]
    batch = make_batch(small_examples, np.array([0, 5, 9]), names)
    assert batch.sparse.keys() == names
    genres = batch.sparse["genres"].to_dense()
    assert [g.tolist() for g in genres] == [
        small_examples.feature_values["genres"][small_examples.feature_offsets["genres"][i]:
                                                small_examples.feature_offsets["genres"][i + 1]].tolist()
        for i in (0, 5, 9)]
    # two ranks together see exactly one process's batch
    one = next(iterate_batches(small_examples, names, 64, shuffle=True, seed=3))
    halves = [next(iterate_batches(small_examples, names, 64, shuffle=True, seed=3, rank=r, world_size=2))
              for r in range(2)]
    assert one.labels.tolist() == halves[0].labels.tolist() + halves[1].labels.tolist()


# --- the schema file: every data set declared the same way ---

def _write_schema(tmp_path, **keys) -> str:
    import yaml

    frame = pd.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "t": [1, 2, 3], "click": [1, 0, 1], "page": ["a", "b", "a"]})
    frame.to_csv(tmp_path / "events.csv", index=False)
    raw = {"path": "events.csv", "user": "u", "item": "i", "timestamp": "t", "label": "click", **keys}
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "schema.yaml")


def test_a_schema_naming_a_missing_column_says_which(tmp_path):
    path = _write_schema(tmp_path, context={"categorical": ["page", "device"]})
    with pytest.raises(DataError, match="column 'device' is declared in the schema but missing from the interactions"):
        read_tables(DatasetSchema.from_yaml(path))


def test_a_schema_with_an_unknown_key_or_value_says_which(tmp_path):
    with pytest.raises(ConfigError, match=r"schema context: unknown key\(s\) \['categoricals'\]"):
        DatasetSchema.from_yaml(_write_schema(tmp_path, context={"categoricals": ["page"]}))
    with pytest.raises(ConfigError, match="timestamp_unit = 'minutes'"):
        DatasetSchema.from_yaml(_write_schema(tmp_path, timestamp_unit="minutes"))
    with pytest.raises(ConfigError, match="history = 'clicks'"):
        DatasetSchema.from_yaml(_write_schema(tmp_path, history="clicks"))
    with pytest.raises(ConfigError, match="declare each column under the group"):
        DatasetSchema.from_yaml(_write_schema(tmp_path, categorical=["page"]))


def test_a_schema_without_a_label_says_so(tmp_path):
    with pytest.raises(ConfigError, match="declare exactly one of 'rating'"):
        DatasetSchema.from_yaml(_write_schema(tmp_path, label=None))


def test_the_run_config_names_a_feature_the_schema_does_not_have(tmp_path):
    from recsys.config import FeatureConfig, load_config
    from recsys.train import Trainer

    config = load_config(None, {"data.schema": _write_schema(tmp_path, context={"categorical": ["page"]})})
    config.features = [FeatureConfig("user_id"), FeatureConfig("device")]
    with pytest.raises(ConfigError, match="features.device: not a feature of the data set"):
        Trainer(config)


def test_replaced_config_keys_say_what_replaced_them():
    from recsys.config import load_config

    with pytest.raises(ConfigError, match="data.dataset is gone: data.schema names the data set"):
        load_config(None, {"data.dataset": "ml100k"})


def test_positive_history_holds_only_clicked_rows_and_counts_them():
    frame = pd.DataFrame({"u": [1, 1, 1, 1], "i": [5, 6, 7, 8], "t": [1, 2, 3, 4], "click": [1, 0, 1, 0]})
    schema = DatasetSchema(path="", user="u", item="i", timestamp="t", label="click", history="positive")
    ex = build_examples(frame, schema, SplitRule(last_n=1))
    assert [ex.history(i, 10).tolist() for i in range(4)] == [[], [5], [5], [5, 7]]
    assert np.expm1(ex.dense[:, 0]).round().tolist() == [0, 1, 1, 2]  # prior behaviours, not impressions
    every = build_examples(frame, DatasetSchema(path="", user="u", item="i", timestamp="t", label="click"),
                           SplitRule(last_n=1))
    assert every.history(3, 10).tolist() == [5, 6, 7]


def test_time_split_is_one_cut_for_everyone():
    frame = pd.DataFrame({"u": [1, 1, 1, 2, 2, 2, 2, 2, 2, 2], "i": range(10), "t": range(10), "click": [1, 0] * 5})
    schema = DatasetSchema(path="", user="u", item="i", timestamp="t", label="click")
    ex = build_examples(frame, schema, SplitRule(kind="time", valid_fraction=0.2, test_fraction=0.2))
    by_time = dict(zip(ex.timestamp.tolist(), ex.split.tolist()))
    assert [by_time[t] for t in range(10)] == [TRAIN] * 6 + [VALID] * 2 + [TEST] * 2
    cut = build_examples(frame, schema, SplitRule(kind="time", valid_from=3, test_from=5))
    assert dict(zip(cut.timestamp.tolist(), cut.split.tolist()))[4] == VALID


def test_numeric_features_are_log_scaled_and_missing_is_zero():
    frame = pd.DataFrame({"u": [1, 2, 3], "i": [1, 2, 3], "t": [1, 2, 3], "click": [1, 0, 1],
                          "price": [np.e - 1, None, -(np.e - 1)]})
    schema = DatasetSchema(path="", user="u", item="i", timestamp="t", label="click",
                           items={"numeric": ["price"]})
    ex = build_examples(frame, schema)
    assert ex.dense_names[-1] == "price"
    np.testing.assert_allclose(ex.dense[:, -1], [1.0, 0.0, -1.0], rtol=1e-6)


def test_kuairand_loads_with_its_own_schema(kuairand_tables):
    schema = kuairand_tables.schema
    assert (schema.timestamp_unit, schema.history, schema.label) == ("ms", "positive", "is_click")
    frame = kuairand_tables.joined()
    assert len(frame) == 228_329 and frame.user_id.nunique() == 25_156 and frame.video_id.nunique() == 6_361
    assert len(kuairand_tables.users) == 27_285 and len(kuairand_tables.items) == 7_583  # catalogues
    ex = build_examples(frame, schema, SplitRule(kind="time"))
    assert ex.label.mean() == pytest.approx(0.4419, abs=1e-4)
    clicked = np.flatnonzero(ex.label == 1)
    # a history holds clicked videos only: the sequences are exactly the clicked rows
    assert len(ex.sequence_items) == len(clicked)
    assert "tab" in ex.feature_names and "video_duration" in ex.dense_names
    first_tag = ex.feature_values["tag"][ex.feature_offsets["tag"][:-1][np.diff(ex.feature_offsets["tag"]) > 0]]
    assert np.isin(ex.feature_values["item_category"], np.append(first_tag, 0)).all()
