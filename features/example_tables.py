"""The offline store -> point-in-time example tables, in SQL: linear in the rows, memory set by a setting.

Every label event (a loaded interaction that is not a ``context`` row, or a streamed one) is an
example with what was known strictly before its instant:

    counters   the user's and the item's behaviours with an earlier timestamp: one running sum
               per key over the behaviours and the examples together, ordered by time and, within
               an instant, examples first (features/example_sql.py ``counted_examples_query``)
    history    the user's behaviours, in (time, load order), of which the example takes those
               before it: the count above is where its history ends in its user's sequence, so
               nothing is copied per example (the Examples layout of features/examples.py)
    profiles   the newest user_profile / item_profile row stamped strictly before the instant:
               an as-of join; the item profile is the loaded one and the rows of the item
               attributes the stream carried (features/event_log.py), each stamped with its
               event's instant

So the cost is a sort of the rows by user and by item, not the square of the rows per user that
Feast's point-in-time join over per-behaviour history snapshots costs (issue 20: 12.5 minutes and
21 GB for 487k ratings there). The offline user_history / item_counters views hold one row per
entity (its latest state: what ``materialize`` copies online); training never joins them.

The result is written as Parquet shards: shard ``s`` holds the examples and the behaviours of
the users with ``user_id mod shards == s``, so each shard is an Examples of its own and a reader
needs one shard in memory at a time (``read_shard``). Tables are registered by name (bulk, stream,
user_profile, item_profile, events), so the queries are engine-neutral SQL except the as-of join,
which each engine writes its own way: DuckDB here (``DuckDBEngine``), Spark past one machine
(features/example_tables_spark.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from features.errors import ConfigError
from features.event_log import stream_item_profile_parts, stream_parts
from features.example_sql import (EngineSettings, behaviours_query, counted_examples_query, interaction_columns,
                                   item_profile_query, path_list, quote, rows_query)
from features.example_tables_spark import SparkEngine
from features.examples import (_raw_ids, _row_features, append_negatives, build_examples, category_id,
                               feature_row_schema, split_parts)
from features.negatives import ImplicitRule, negatives_query

log = logging.getLogger("plexrec.features")

EXAMPLES, BEHAVIOURS, MANIFEST = "examples", "behaviours", "manifest.json"
@dataclass
class ExampleTables:
    """Where a build wrote its shards, and what it found."""

    directory: Path
    shards: int
    examples: int
    behaviours: int
    seconds: float
    valid_from: int | None = None  # a time split's cuts, computed over every example
    test_from: int | None = None

    def shard_paths(self, shard: int) -> tuple[Path, Path]:
        return (self.directory / EXAMPLES / f"shard-{shard:05d}.parquet",
                self.directory / BEHAVIOURS / f"shard-{shard:05d}.parquet")

    def summary(self) -> str:
        return (f"{self.examples:,} examples and {self.behaviours:,} behaviours in {self.shards} shard(s) "
                f"in {self.seconds:.1f} s")

    @classmethod
    def open(cls, directory: str | Path) -> ExampleTables:
        meta = json.loads((Path(directory) / MANIFEST).read_text())
        return cls(directory=Path(directory), **meta)


# ---------------------------------------------------------------------------------------------
# DuckDB


class DuckDBEngine:
    """The embedded engine: the offline Parquet files as views, spilling past ``memory_limit``."""

    name = "duckdb"

    def __init__(self, offline: Path, schema, settings: EngineSettings = EngineSettings(),
                 events: pd.DataFrame | None = None):
        import duckdb

        self.schema = schema
        self.connection = duckdb.connect()
        self.own_temp_dir = None if settings.temp_dir else tempfile.mkdtemp(prefix="plexrec-duckdb-")
        temp_dir = settings.temp_dir or self.own_temp_dir
        self.connection.execute(f"SET memory_limit = '{settings.memory_limit}'")
        self.connection.execute(f"SET temp_directory = '{temp_dir}'")
        self.connection.execute("SET preserve_insertion_order = false")
        if settings.threads:
            self.connection.execute(f"SET threads = {int(settings.threads)}")
        columns = ", ".join(quote(c) for c in interaction_columns(schema))
        self.connection.execute(
            f"CREATE VIEW bulk AS SELECT {columns}, CAST(file_row_number AS BIGINT) AS ordinal "
            f"FROM read_parquet('{offline / 'interactions.parquet'}', file_row_number = true)")
        streamed = stream_parts(offline.parent)
        self.has_stream = bool(streamed)
        if self.has_stream:
            self.connection.execute(f"CREATE VIEW stream AS SELECT {columns}, ordinal "
                                    f"FROM read_parquet({path_list(streamed)})")
        self.has_users = (offline / "user_profile.parquet").exists() and bool(schema.users.columns)
        if self.has_users:
            self.connection.execute(f"CREATE VIEW user_profile AS SELECT * FROM read_parquet("
                                    f"'{offline / 'user_profile.parquet'}')")
        self.connection.execute(f"CREATE VIEW loaded_item_profile AS SELECT * FROM read_parquet("
                                f"'{offline / 'item_profile.parquet'}')")
        profiles = stream_item_profile_parts(offline.parent)  # item attributes the stream carried
        if profiles:
            self.connection.execute(f"CREATE VIEW stream_item_profile AS SELECT * "
                                    f"FROM read_parquet({path_list(profiles)})")
        self.connection.execute(f"CREATE VIEW item_profile AS {item_profile_query(schema, bool(profiles))}")
        self.connection.execute("CREATE VIEW latest_item_profile AS SELECT * FROM item_profile "
                                "QUALIFY ROW_NUMBER() OVER (PARTITION BY item_id ORDER BY event_timestamp DESC) = 1")
        self.connection.execute(f"CREATE VIEW rows AS {rows_query(schema, self.has_stream)}")
        if events is not None:
            # an ordinal of their own: the window's rows are matched among the examples only
            ordered = events.assign(ordinal=np.arange(len(events), dtype=np.int64))
            self.connection.register("events_frame", ordered)
            self.connection.execute(f"CREATE VIEW events AS SELECT {columns}, ordinal FROM events_frame")

    def with_profiles(self, counted: str) -> str:
        """The as-of join: each example gets the newest profile rows stamped strictly before it.
        A view of one row per key (as a load writes them, and the item profile until the stream
        carries item attributes) needs no as-of search: a hash join with the same condition finds
        the same row without sorting both sides (16M rows: the whole build 25 s -> 13 s)."""
        unit = 1_000_000 // self.schema.units_per_second
        joins, columns = [], []
        views = [("user_profile", "user_id", self.schema.users.columns)] if self.has_users else []
        views.append(("item_profile", "item_id", [*self.schema.items.columns, "item_category"]))
        for alias, (view, key, profile_columns) in enumerate(views):
            one_row_per_key = self.scalar(f"SELECT COUNT(*) = COUNT(DISTINCT {key}) FROM {view}")
            join = "LEFT JOIN" if one_row_per_key else "ASOF LEFT JOIN"
            joins.append(f"{join} (SELECT *, epoch_us(event_timestamp) AS at_us FROM {view}) AS p{alias} "
                         f"ON c.{key} = p{alias}.{key} AND c.at_us > p{alias}.at_us")
            columns += [f"p{alias}.{quote(column)}" for column in profile_columns]
        return (f"SELECT c.* EXCLUDE (at_us){''.join(', ' + c for c in columns)} "
                f"FROM (SELECT *, timestamp * {unit} AS at_us FROM ({counted})) AS c {' '.join(joins)}")

    def scalar(self, sql: str):
        return self.connection.execute(sql).fetchone()[0]

    def copy_sharded(self, sql: str, folder: Path, shards: int) -> None:
        """Write ``sql``'s rows as one Parquet file per user shard (user_id mod shards)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.connection.execute(
            f"COPY (SELECT *, CAST(((user_id % {shards}) + {shards}) % {shards} AS INTEGER) AS shard FROM ({sql})) "
            f"TO '{folder}' (FORMAT parquet, PARTITION_BY (shard), OVERWRITE_OR_IGNORE true, "
            f"FILENAME_PATTERN 'part-{{i}}')")
        for partition in folder.glob("shard=*"):  # shard=K/part-*.parquet -> shard-0000K.parquet
            parts = sorted(partition.glob("*.parquet"))
            target = folder / f"shard-{int(partition.name.split('=')[1]):05d}.parquet"
            if len(parts) == 1:
                os.replace(parts[0], target)
            else:  # one row group at a time: a shard never has to fit in memory here
                with pq.ParquetWriter(target, pq.read_schema(parts[0])) as writer:
                    for part in parts:
                        file = pq.ParquetFile(part)
                        for group in range(file.num_row_groups):
                            writer.write_table(file.read_row_group(group))
            shutil.rmtree(partition)

    def close(self) -> None:
        self.connection.close()
        if self.own_temp_dir:
            shutil.rmtree(self.own_temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# building and reading


def build_example_tables(offline: Path, schema, out: Path, *, shards: int = 1, split=None,
                         events: pd.DataFrame | None = None, settings: EngineSettings = EngineSettings(),
                         engine: str = "duckdb", shard_examples: int | None = None,
                         min_shards: int = 1) -> ExampleTables:
    """Every label event's example (or, given ``events``, interaction rows of the store's columns:
    those events' examples alone, with the features of their instants) as Parquet shards in
    ``out``: ``shards`` of them, or with ``shard_examples``, as many as hold about that many
    examples each (at least ``min_shards``: a torchrun job's ranks); ``split``: a SplitRule whose
    time cuts are computed here over every example."""
    started = time.perf_counter()
    if engine == "spark":
        if schema.implicit:
            raise ConfigError(f"schema {schema.name}: implicit feedback (sampled negatives) is built by DuckDB only; "
                              "set data.example_engine: duckdb (the Spark engine does not sample negatives yet)")

        runner = SparkEngine(offline, schema, settings, events)
    elif engine == "duckdb":
        runner = DuckDBEngine(offline, schema, settings, events)
    else:
        raise ValueError(f"unknown example engine {engine!r}: choose duckdb or spark")
    try:
        window_only = events is not None
        examples_from = "SELECT * FROM events" if window_only else "SELECT * FROM rows WHERE is_example = 1"
        labelled = examples_from  # the label events: a time split's cuts are theirs
        if schema.implicit:  # and each positive's sampled negatives (features/negatives.py)
            columns = ", ".join(quote(c) for c in interaction_columns(schema))
            examples_from = (f"SELECT {columns}, ordinal, CAST(0 AS BIGINT) AS sample FROM ({labelled}) AS l "
                             f"UNION ALL SELECT * FROM ({negatives_query(schema, labelled, [quote(c) for c in interaction_columns(schema)])}) AS n")
            if engine == "duckdb":  # drawn once: the shards and the counts read the same rows
                runner.connection.execute(f"CREATE TEMP TABLE plexrec_examples AS {examples_from}")
                examples_from = "SELECT * FROM plexrec_examples"
        counted = counted_examples_query(schema, examples_from, window_only, sampled=bool(schema.implicit))
        if shard_examples:
            count = runner.scalar(f"SELECT COUNT(*) FROM ({examples_from}) AS e")
            shards = max(min_shards, -(-int(count) // shard_examples))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        runner.copy_sharded(runner.with_profiles(counted), out / EXAMPLES, shards)
        behaviours_sql = behaviours_query(schema, labelled, window_only)
        runner.copy_sharded(behaviours_sql, out / BEHAVIOURS, shards)
        examples = runner.scalar(f"SELECT COUNT(*) FROM ({examples_from}) AS e")
        behaviours = runner.scalar(f"SELECT COUNT(*) FROM ({behaviours_sql}) AS b")
        valid_from = test_from = None
        if split is not None and split.kind == "time" and not schema.split and examples:
            labelled_count = examples if not schema.implicit else runner.scalar(
                f"SELECT COUNT(*) FROM ({labelled}) AS e")
            valid_from, test_from = time_cuts(runner, labelled, labelled_count, split)
    finally:
        runner.close()
    tables = ExampleTables(out, shards, int(examples), int(behaviours), time.perf_counter() - started,
                           valid_from, test_from)
    meta = {k: v for k, v in dataclasses.asdict(tables).items() if k != "directory"}
    (out / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    return tables


def time_cuts(runner, examples_from: str, n: int, split) -> tuple[int, int]:
    """SplitRule.time_cuts over every example's timestamp, without holding them: the k-th smallest."""
    def kth(fraction: float) -> int:
        if fraction is None:
            return None
        k = min(n - 1, int(n * fraction))
        return int(runner.scalar(f"SELECT timestamp FROM ({examples_from}) AS e ORDER BY timestamp "
                                 f"LIMIT 1 OFFSET {k}"))

    test_from = split.test_from if split.test_from is not None else kth(1 - split.test_fraction)
    valid_from = split.valid_from if split.valid_from is not None else kth(
        1 - split.test_fraction - split.valid_fraction)
    return valid_from, test_from


def shard_split(tables: ExampleTables, split):
    """The split rule a build's shards are read with: a time split takes the cuts computed over
    every example at build time (one shard alone would cut at its own quantiles)."""
    if split is not None and tables.test_from is not None:
        return dataclasses.replace(split, valid_from=tables.valid_from, test_from=tables.test_from)
    return split


def shard_split_counts(tables: ExampleTables, shard: int, schema, split) -> tuple[dict[int, int], int | None]:
    """(examples per split part, newest timestamp) of one shard, from the columns the split reads
    (what read_shard would assign, without building the examples)."""
    examples_path, _ = tables.shard_paths(shard)
    if not examples_path.exists():
        return {}, None
    rows_schema = feature_row_schema(schema)
    columns = ["user_id", "timestamp", "ordinal"] + ([rows_schema.split] if rows_schema.split else [])
    sampled = bool(schema.implicit) and "sample" in pq.read_schema(examples_path).names
    rows = pd.read_parquet(examples_path, columns=columns + (["sample"] if sampled else []))
    if rows.empty:
        return {}, None
    rows = rows.sort_values(["user_id", "timestamp", "ordinal"]).reset_index(drop=True)
    if not sampled:
        parts, counts = np.unique(split_parts(rows, rows_schema, shard_split(tables, split)), return_counts=True)
        return dict(zip(parts.tolist(), counts.tolist())), int(rows["timestamp"].max())
    # sampled negatives are in their positive's part (and take no place in a user's sequence)
    negative = rows["sample"].to_numpy(np.int64) > 0
    labelled = rows[~negative].reset_index(drop=True)
    part = split_parts(labelled, rows_schema, shard_split(tables, split))
    parent = pd.Index(labelled["ordinal"].to_numpy(np.int64)).get_indexer(rows.loc[negative, "ordinal"].to_numpy(np.int64))
    parts, counts = np.unique(np.concatenate([part, part[parent]]), return_counts=True)
    return dict(zip(parts.tolist(), counts.tolist())), int(rows["timestamp"].max())


def read_shard(tables: ExampleTables, shard: int, schema, split, history_length: int):
    """One shard's Examples: its examples' features, labels and split, and its users' behaviour
    sequences, each history at most ``history_length`` long (the store's)."""
    examples_path, behaviours_path = tables.shard_paths(shard)
    if not examples_path.exists():
        return None
    rows = pd.read_parquet(examples_path).sort_values(["user_id", "timestamp", "ordinal"]).reset_index(drop=True)
    negatives = None
    if "sample" in rows:  # implicit feedback: the sampled negatives, added once the positives are built
        sampled = rows["sample"].to_numpy(np.int64) > 0
        negatives = rows[sampled].reset_index(drop=True)
        rows = rows[~sampled].reset_index(drop=True)
    examples = build_examples(rows, feature_row_schema(schema), shard_split(tables, split))
    examples.dense[:, 0] = np.log1p(rows["user_interaction_count"].to_numpy(np.int64)).astype(np.float32)
    examples.dense[:, 1] = np.log1p(rows["item_interaction_count"].to_numpy(np.int64)).astype(np.float32)

    behaviours = (pd.read_parquet(behaviours_path) if behaviours_path.exists() else
                  pd.DataFrame({"user_id": [], "item_id": [], "timestamp": [], "ordinal": [], "item_category": []}))
    behaviours = behaviours.sort_values(["user_id", "timestamp", "ordinal"]).reset_index(drop=True)
    behaviour_users = behaviours["user_id"].to_numpy(np.int64)
    user_ids = rows["user_id"].to_numpy(np.int64)
    first = np.searchsorted(behaviour_users, user_ids, side="left")
    end = first + rows["user_interaction_count"].to_numpy(np.int64)  # the behaviours strictly before
    start = np.maximum(first, end - history_length)
    examples.sequence_items = behaviours["item_id"].to_numpy(np.int64)
    examples.sequence_timestamps = behaviours["timestamp"].to_numpy(np.int64)
    if schema.category:
        categories = behaviours["item_category"]
        codes, distinct = pd.factorize(categories, use_na_sentinel=True)
        ids = np.fromiter((category_id(c) for c in distinct), dtype=np.int64, count=len(distinct))
        examples.sequence_categories = np.where(codes >= 0, ids[np.maximum(codes, 0)], category_id(None))
    examples.sequence_start = start.astype(np.int64)
    examples.history_length = (end - start).astype(np.int64)
    examples.schema = schema
    if negatives is not None and len(negatives):
        examples = _with_negative_rows(examples, rows, negatives, schema)
    return examples


def _with_negative_rows(examples, rows: pd.DataFrame, negatives: pd.DataFrame, schema):
    """A shard's Examples with its sampled negatives (rows with ``sample`` = k + 1 and their
    positive's ordinal), each after its positive, as the direct loader places them."""
    rows_schema = feature_row_schema(schema)
    parent = pd.Index(rows["ordinal"].to_numpy(np.int64)).get_indexer(negatives["ordinal"].to_numpy(np.int64))
    user_raw, _ = _raw_ids(negatives["user_id"])
    item_raw, _ = _raw_ids(negatives["item_id"])
    values, offsets, numeric = _row_features(negatives, rows_schema, user_raw, item_raw)
    item_count = negatives["item_interaction_count"].to_numpy(np.int64)
    dense = np.stack([examples.dense[parent, 0], np.log1p(item_count).astype(np.float32), *numeric], axis=1)
    return append_negatives(examples, parent, negatives["sample"].to_numpy(np.int64) - 1, values, offsets, dense,
                            item_raw, ImplicitRule.of(schema.implicit).negatives)
