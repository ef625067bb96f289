"""The Spark example engine (pyspark in local mode, installed by the project) builds DuckDB's example
tables row for row: every shard of examples and behaviours, the counts and the time split's cuts,
and the Examples training reads, on ML-100K and KuaiRand; a window of events; streamed rows."""

import shutil

import pandas as pd
import pytest

from features.example_sql import STREAM_ORDINAL_BASE, EngineSettings, interaction_columns
from features.example_tables import ExampleTables, build_example_tables
from features.example_tables_spark import SparkEngine, jvm_memory, spark_session
from features.load import load_into_store
from features.store import open_store, stored_schema
from features.training import examples_from_store
from features.examples import SplitRule

from .test_feature_store import assert_same_examples

SETTINGS = EngineSettings(memory_limit="1GB")


@pytest.fixture(scope="module")
def spark():
    """One local SparkSession for the module: each engine finds it active and leaves it running."""
    session, started = spark_session(SETTINGS)
    yield session
    if started:
        session.stop()


@pytest.fixture(scope="module")
def ml_store(ml100k_tables, tmp_path_factory):
    directory = tmp_path_factory.mktemp("spark-ml100k")
    load_into_store(open_store("local", directory), ml100k_tables, directory, history_length=200)
    return directory


@pytest.fixture(scope="module")
def kuairand_store(kuairand_tables, tmp_path_factory):
    """Impressions of users < 3000 (ms timestamps, clicked-only histories, a context column)."""
    directory = tmp_path_factory.mktemp("spark-kuairand")
    interactions = kuairand_tables.interactions
    tables = kuairand_tables.with_interactions(interactions[interactions.user_id < 3000])
    load_into_store(open_store("local", directory), tables, directory, history_length=30)
    return directory


def build_both(directory, out, **options) -> tuple[ExampleTables, ExampleTables]:
    schema = stored_schema(directory)
    return tuple(build_example_tables(directory / "offline", schema, out / engine, engine=engine,
                                      settings=SETTINGS, **options) for engine in ("duckdb", "spark"))


def shard_frame(path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("ordinal").reset_index(drop=True)


def assert_same_tables(duckdb: ExampleTables, spark: ExampleTables) -> int:
    """Every shard's rows equal (sorted by ordinal: each engine writes its own order), every column
    of the same name, type and values; the counts and the split's cuts equal. The rows compared."""
    assert (spark.shards, spark.examples, spark.behaviours) == (duckdb.shards, duckdb.examples, duckdb.behaviours)
    assert (spark.valid_from, spark.test_from) == (duckdb.valid_from, duckdb.test_from)
    compared = 0
    for shard in range(duckdb.shards):
        for expected_path, got_path in zip(duckdb.shard_paths(shard), spark.shard_paths(shard)):
            assert expected_path.exists() == got_path.exists(), got_path
            if not expected_path.exists():
                continue
            expected, got = shard_frame(expected_path), shard_frame(got_path)
            assert list(got.columns) == list(expected.columns), got_path
            assert got["ordinal"].is_unique
            pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=str(got_path))
            compared += len(got)
    assert len(list((spark.directory / "examples").iterdir())) == len(list((duckdb.directory / "examples").iterdir()))
    return compared


def test_spark_builds_duckdbs_example_tables_on_ml100k(spark, ml_store, tmp_path):
    duckdb, on_spark = build_both(ml_store, tmp_path, shards=3)
    assert duckdb.examples == 100_000
    assert assert_same_tables(duckdb, on_spark) == 2 * 100_000
    rows = shard_frame(on_spark.shard_paths(0)[0])
    assert rows["gender"].notna().all() and rows["genres"].map(len).gt(0).any()  # both profiles joined
    assert (rows["user_interaction_count"] > 0).mean() > 0.9


def test_spark_builds_duckdbs_example_tables_on_kuairand(spark, kuairand_store, tmp_path):
    """With a time split: its cuts are the k-th smallest example times, on either engine."""
    duckdb, on_spark = build_both(kuairand_store, tmp_path, shards=2, split=SplitRule(kind="time"))
    assert duckdb.test_from is not None and duckdb.behaviours < duckdb.examples  # clicked-only histories
    assert assert_same_tables(duckdb, on_spark) == duckdb.examples + duckdb.behaviours


@pytest.mark.parametrize("store, split, history_length", [
    ("ml_store", SplitRule(), 200), ("kuairand_store", SplitRule(kind="time"), 30)])
def test_training_examples_from_the_store_on_spark_are_duckdbs(spark, request, store, split, history_length):
    directory = request.getfixturevalue(store)
    store = open_store("local", directory)
    on_duckdb = examples_from_store(store, directory, split=split)
    on_spark = examples_from_store(store, directory, split=split, engine="spark", settings=SETTINGS)
    assert_same_examples(on_spark, on_duckdb, history_length)


def test_a_window_of_events_gets_the_same_features_on_spark(spark, ml_store, tmp_path):
    """``events`` (a learner's window): those rows alone are examples, with the store's features."""
    schema = stored_schema(ml_store)
    loaded = pd.read_parquet(ml_store / "offline" / "interactions.parquet")
    window = loaded.iloc[40_000:40_600][interaction_columns(schema)]
    duckdb, on_spark = build_both(ml_store, tmp_path, events=window, shards=2)
    assert duckdb.examples == 600
    assert assert_same_tables(duckdb, on_spark) == 600 + duckdb.behaviours


def test_streamed_rows_come_after_the_loaded_ones_on_spark(spark, broker, ml100k_tables, tmp_path):
    """A store with streamed parts (some of them replays of loaded rows, which the rows query drops):
    the stream's ordinals above STREAM_ORDINAL_BASE, the replays gone, on both engines."""
    from features.event_log import compact_event_log, stream_parts
    from features.events import schema_events

    from .test_event_log import split_by_time, stream

    schema = ml100k_tables.schema
    ratings = ml100k_tables.interactions
    past, future = split_by_time(ratings[ratings[schema.user] <= 30], schema, 0.7)
    store = open_store("local", tmp_path)
    load_into_store(store, ml100k_tables.with_interactions(past), tmp_path, history_length=50)
    stream(broker, store, tmp_path, schema_events(future, schema) + schema_events(past.iloc[::40], schema))
    compact_event_log(tmp_path)
    assert stream_parts(tmp_path)
    duckdb, on_spark = build_both(tmp_path, tmp_path / "examples", shards=2)
    assert duckdb.examples == len(past) + len(future)
    assert assert_same_tables(duckdb, on_spark) == duckdb.examples + duckdb.behaviours
    ordinals = pd.concat([shard_frame(on_spark.shard_paths(s)[0]) for s in range(2)])["ordinal"]
    assert (ordinals >= STREAM_ORDINAL_BASE).sum() == len(future)


def test_streamed_item_attributes_are_the_same_profile_rows_on_spark(spark, broker, ml100k_tables, tmp_path):
    """Events carrying item attributes (features/event_log.py: streamed item-profile rows): both engines
    give every example after the change the new values and none before, row for row."""
    from features.event_log import compact_event_log, stream_item_profile_parts
    from features.events import schema_events

    from .test_event_log import split_by_time, stream

    schema = ml100k_tables.schema
    ratings = ml100k_tables.interactions
    past, future = split_by_time(ratings[ratings[schema.user] <= 30], schema, 0.7)
    store = open_store("local", tmp_path)
    load_into_store(store, ml100k_tables.with_interactions(past), tmp_path, history_length=50)
    events = schema_events(future, schema)
    items = future[schema.item].value_counts().index[:3].astype(int).tolist()
    changed = {}
    for item, attributes in zip(items, ({"genres": "Documentary"}, {"release_year": "2001"},
                                        {"genres": "Film-Noir|Drama", "release_year": "1950"})):
        times = future.loc[future[schema.item] == item, schema.timestamp].sort_values()
        changed[item] = int(times.iloc[len(times) // 2])
        next(e for e in events if e.item_id == item and e.event_time_ms == changed[item] * 1000
             ).item_attributes.update(attributes)
    stream(broker, store, tmp_path, events)
    compact_event_log(tmp_path)
    assert stream_item_profile_parts(tmp_path)
    duckdb, on_spark = build_both(tmp_path, tmp_path / "examples", shards=2)
    assert assert_same_tables(duckdb, on_spark) == duckdb.examples + duckdb.behaviours
    rows = pd.concat([shard_frame(on_spark.shard_paths(s)[0]) for s in range(2)])
    documentary = rows[rows["item_id"] == items[0]]
    assert ((documentary["item_category"] == "Documentary") == (documentary["timestamp"] > changed[items[0]])).all()
    noir = rows[rows["item_id"] == items[2]]
    assert ((noir["release_year"] == 1950) == (noir["timestamp"] > changed[items[2]])).all()


def test_profiles_with_several_versions_take_the_newest_before_each_example(spark, ml_store, tmp_path):
    """Profile rows restamped mid-data (new values for some users and items): each example takes the
    version stamped strictly before it (DuckDB's as-of join; a join and ROW_NUMBER on Spark), the
    behaviours the item's newest category."""
    offline = tmp_path / "offline"
    offline.mkdir()
    shutil.copy(ml_store / "offline" / "interactions.parquet", offline)
    middle = int(pd.read_parquet(offline / "interactions.parquet")["timestamp"].median())
    for view, key, changed in (("user_profile", "user_id", "occupation"), ("item_profile", "item_id", "item_category")):
        first = pd.read_parquet(ml_store / "offline" / f"{view}.parquet")
        later = first[first[key] % 3 == 0].assign(**{changed: lambda f: f[changed].astype(str) + "-later"})
        later["event_timestamp"] = pd.to_datetime(middle, unit="s", utc=True)
        pd.concat([first, later]).to_parquet(offline / f"{view}.parquet", index=False)
    schema = stored_schema(ml_store)
    duckdb, on_spark = (build_example_tables(offline, schema, tmp_path / engine, engine=engine, settings=SETTINGS)
                        for engine in ("duckdb", "spark"))
    assert assert_same_tables(duckdb, on_spark) == 2 * 100_000
    rows = shard_frame(on_spark.shard_paths(0)[0])
    later = rows["occupation"].str.endswith("-later")
    assert later.any() and (rows.loc[later, "timestamp"] > middle).all()
    newer = (rows["item_id"] % 3 == 0) & (rows["timestamp"] > middle)
    assert (rows["item_category"].str.endswith("-later") == newer).all()


def test_an_engine_leaves_a_session_it_did_not_start_as_it_was(spark, ml_store):
    spark.conf.set("spark.sql.ansi.doubleQuotedIdentifiers", "false")
    engine = SparkEngine(ml_store / "offline", stored_schema(ml_store), SETTINGS)
    assert engine.spark is spark and not engine.started
    assert engine.scalar('SELECT COUNT(*) FROM rows WHERE "is_example" = 1') == 100_000
    engine.close()
    assert spark.conf.get("spark.sql.ansi.doubleQuotedIdentifiers") == "false"
    assert not spark.catalog.tableExists("rows") and not spark.sparkContext._jsc.sc().isStopped()
    spark.conf.unset("spark.sql.ansi.doubleQuotedIdentifiers")


def test_memory_settings_read_as_jvm_sizes():
    assert jvm_memory("2GB") == "2048m" and jvm_memory("512MiB") == "512m" and jvm_memory("1.5 GB") == "1536m"
    assert jvm_memory("75%") is None and jvm_memory(None) is None
    assert jvm_memory("100000KB") == "97m"
