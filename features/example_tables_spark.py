"""The example tables on Spark: the same SQL as DuckDB's (features/example_sql.py), past one machine.

    build_example_tables(offline, schema, out, engine="spark")
    plexrec train --set data.source=feast --set data.example_engine=spark

``SparkEngine`` registers the tables the engine-neutral queries read (bulk, stream, user_profile,
loaded_item_profile, stream_item_profile, item_profile, latest_item_profile, rows, events) as temporary views of one SparkSession and
writes the result as ``shard-%05d.parquet`` files like ``DuckDBEngine``: the same columns and the
same rows (tests/test_example_tables_spark.py compares them row for row). Spark's own ways:

    ordinal      a bulk row's ordinal is its row in ``interactions.parquet``: Parquet's
                 ``_metadata.row_index``, DuckDB's ``file_row_number`` (exact however the file is
                 split into tasks); streamed rows carry theirs in the file, ``events`` get 0..n-1
    as-of join   Spark has no ASOF JOIN: a left join on the key with the profile stamped strictly
                 before the example; where a profile holds several rows of one key, the newest of
                 them by ROW_NUMBER() over the example's ordinal (profiles written by
                 ``features load`` hold one row per entity, so the join alone does it until the
                 stream carries item attributes)
    identifiers  double-quoted (``spark.sql.ansi.doubleQuotedIdentifiers``), as the queries quote
    shards       written by the executors partitioned by shard into a staging folder, then
                 gathered by the driver into one file per shard (row group by row group)

Where it runs. ``EngineSettings.spark_master`` (None: ``$PLEXREC_SPARK_MASTER``, else ``local[*]``
or ``local[threads]``: Spark inside a JVM child of this process, memory ``memory_limit`` as
``spark.driver.memory``, spilling to ``temp_dir``). With a cluster's master URL
(``spark://host:7077``, ``yarn``, ``k8s://...``) the executors read the offline Parquet files by
their paths, so the data directory must be on storage every node mounts at the same path (NFS or
the like), and they write their output to a staging folder the driver then reads:
``$PLEXREC_SPARK_STAGING`` if set, else ``<data dir>/spark-staging`` (shared, like the offline files).
Executor memory and cores are the cluster's settings (``spark-defaults.conf``, ``$SPARK_CONF_DIR``).
A SparkSession already active in this process (a notebook's, a test module's) is used as it is
(its master and memory; the SQL settings below are set for the build and put back) and left
running (its views are named as DuckDB's: one build at a time per session); one the engine
started it stops on ``close``. Measured on a 2-core machine: Spark's start
and per-query cost make it slower than DuckDB on one machine (ML-100K about 20 s against 0.4 s,
1M rows 70 s against 12 s, JVM RSS about memory_limit + 1.5 GB); it is the engine for data a
cluster holds, DuckDB the one for a machine.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from features.event_log import stream_item_profile_parts, stream_parts
from features.example_sql import EngineSettings, interaction_columns, item_profile_query, quote, rows_query

log = logging.getLogger("plexrec.features")
# py4j logs an INFO line from a finaliser at interpreter exit, when the streams are closed ("Logging error")
logging.getLogger("py4j").setLevel(logging.WARNING)

MASTER_ENV = "PLEXREC_SPARK_MASTER"
STAGING_ENV = "PLEXREC_SPARK_STAGING"

# per-session SQL settings the queries need (set on a session the engine did not start too, and
# put back on close)
SQL_SETTINGS = {
    "spark.sql.ansi.enabled": "true",
    "spark.sql.ansi.doubleQuotedIdentifiers": "true",  # "column" is a column, as in DuckDB
    "spark.sql.session.timeZone": "UTC",  # a profile's naive timestamp is UTC, as DuckDB's epoch_us reads it
    "spark.sql.execution.arrow.pyspark.enabled": "true",  # events: pandas -> Spark through Arrow
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",  # not INT96
}


def master_url(settings: EngineSettings) -> str:
    master = settings.spark_master or os.environ.get(MASTER_ENV) or "local[*]"
    if master == "local[*]" and settings.threads:
        master = f"local[{int(settings.threads)}]"
    return master


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def jvm_memory(limit: str | None) -> str | None:
    """DuckDB's memory setting ("2GB", "512MiB", "1.5 GB") as a JVM size ("2048m"); None for what
    has no absolute size ("75%")."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", (limit or "").lower())
    if not match:
        return None
    scale = {"": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20}[match.group(2)]
    return f"{max(1, int(float(match.group(1)) * scale))}m"


def spark_session(settings: EngineSettings = EngineSettings(), app_name: str = "plexrec-examples"):
    """(session, started): the SparkSession active in this process if any (started False), else a
    new one at ``master_url(settings)`` (started True)."""
    try:
        from pyspark import SparkContext
        from pyspark.sql import SparkSession
    except ImportError as error:  # pragma: no cover - the project installs it (pyproject's spark extra)
        raise ImportError("the spark example engine needs pyspark: pip install -e '.[spark]' "
                          "(scripts/install.sh installs it)") from error

    active = SparkSession.getActiveSession()
    if active is None and SparkContext._active_spark_context is not None:
        active = SparkSession.builder.getOrCreate()  # a context of another thread: the same one
    if active is not None:
        return active, False
    master = master_url(settings)
    builder = (SparkSession.builder.master(master).appName(app_name).config("spark.log.level", "WARN")
               .config("spark.log.structuredLogging.enabled", "false")
               # no tables are created, but a session makes its warehouse folder: not in the working directory
               .config("spark.sql.warehouse.dir", str(Path(tempfile.gettempdir()) / "plexrec-spark-warehouse")))
    memory = jvm_memory(settings.memory_limit)
    if memory:
        builder = builder.config("spark.driver.memory", memory)
    if is_local(master):
        builder = (builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                   .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1"))
        if settings.temp_dir:
            builder = builder.config("spark.local.dir", settings.temp_dir)
        # a few tasks per core per shuffle (adaptive execution coalesces them further), not Spark's
        # 200, whose per-task cost dominates on one machine
        cores = settings.threads or os.cpu_count() or 1
        builder = builder.config("spark.sql.shuffle.partitions", str(max(4, 4 * cores)))
    for key, value in SQL_SETTINGS.items():
        builder = builder.config(key, value)
    log.info("spark: starting a session at %s (driver memory %s)", master, memory or "Spark's default")
    return builder.getOrCreate(), True


class SparkEngine:
    """The offline Parquet files as Spark views; the queries of features/example_sql.py on them."""

    name = "spark"

    def __init__(self, offline: Path, schema, settings: EngineSettings = EngineSettings(),
                 events: pd.DataFrame | None = None):
        from pyspark.sql import functions as F

        self.schema = schema
        self.offline = Path(offline)
        self.spark, self.started = spark_session(settings)
        self.master = self.spark.sparkContext.master
        self.saved = {key: self.spark.conf.get(key, None) for key in SQL_SETTINGS}
        for key, value in SQL_SETTINGS.items():
            self.spark.conf.set(key, value)
        self.views: list[str] = []
        try:
            columns = interaction_columns(schema)
            bulk = self.spark.read.parquet(str(self.offline / "interactions.parquet"))
            self.register("bulk", bulk.select(*[F.col(f"`{c}`") for c in columns],
                                              F.col("_metadata.row_index").cast("bigint").alias("ordinal")))
            streamed = stream_parts(self.offline.parent)
            self.has_stream = bool(streamed)
            if self.has_stream:
                stream = self.spark.read.parquet(*[str(path) for path in streamed])
                self.register("stream", stream.select(*[F.col(f"`{c}`") for c in columns],
                                                      F.col("ordinal").cast("bigint")))
            self.has_users = (self.offline / "user_profile.parquet").exists() and bool(schema.users.columns)
            self.unique: dict[str, bool] = {}
            if self.has_users:
                self.register("user_profile", self.spark.read.parquet(str(self.offline / "user_profile.parquet")))
            self.register("loaded_item_profile", self.spark.read.parquet(str(self.offline / "item_profile.parquet")))
            profiles = stream_item_profile_parts(self.offline.parent)  # item attributes the stream carried
            if profiles:
                self.register("stream_item_profile", self.spark.read.parquet(*[str(path) for path in profiles]))
            self.register("item_profile", self.spark.sql(item_profile_query(schema, bool(profiles))))
            for view, key in [("user_profile", "user_id")] * self.has_users + [("item_profile", "item_id")]:
                self.unique[view] = bool(self.scalar(f"SELECT COUNT({key}) = COUNT(DISTINCT {key}) FROM {view}"))
            profile_columns = ", ".join(quote(c) for c in self.spark.table("item_profile").columns)
            self.register("latest_item_profile", self.spark.sql(
                f"SELECT {profile_columns} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY item_id "
                f"ORDER BY event_timestamp DESC) AS plexrec_rank FROM item_profile) AS p WHERE plexrec_rank = 1"))
            self.register("rows", self.spark.sql(rows_query(schema, self.has_stream)))
            if events is not None:
                # as DuckDBEngine: an ordinal of their own, the window's rows are matched among the examples only
                ordered = events[columns].assign(ordinal=np.arange(len(events), dtype=np.int64))
                self.register("events", self.spark.createDataFrame(ordered.reset_index(drop=True)))
        except BaseException:
            self.close()
            raise

    def register(self, name: str, frame) -> None:
        frame.createOrReplaceTempView(name)
        self.views.append(name)

    def with_profiles(self, counted: str) -> str:
        """The as-of join: each example gets the newest profile rows stamped strictly before it."""
        unit = 1_000_000 // self.schema.units_per_second
        names = list(self.spark.sql(counted).columns)  # analysed, not run
        views = [("user_profile", "user_id", self.schema.users.columns)] if self.has_users else []
        views.append(("item_profile", "item_id", [*self.schema.items.columns, "item_category"]))
        sql = counted
        for alias, (view, key, profile_columns) in enumerate(views):
            p = f"p{alias}"
            keep = ", ".join([f"c.{quote(n)}" for n in names] + [f"{p}.{quote(n)}" for n in profile_columns])
            joined = (f"FROM ({sql}) AS c LEFT JOIN (SELECT *, unix_micros(CAST(event_timestamp AS TIMESTAMP)) "
                      f"AS plexrec_at_us FROM {view}) AS {p} "
                      f"ON c.{key} = {p}.{key} AND c.timestamp * {unit} > {p}.plexrec_at_us")
            if self.unique[view]:  # one profile row per key: at most one match
                sql = f"SELECT {keep} {joined}"
            else:
                names_after = ", ".join(quote(n) for n in [*names, *profile_columns])
                sql = (f"SELECT {names_after} FROM (SELECT {keep}, ROW_NUMBER() OVER (PARTITION BY c.ordinal "
                       f"ORDER BY {p}.plexrec_at_us DESC) AS plexrec_rank {joined}) AS ranked WHERE plexrec_rank = 1")
            names += profile_columns
        return sql

    def scalar(self, sql: str):
        return self.spark.sql(sql).first()[0]

    def staging_root(self, folder: Path) -> Path:
        if os.environ.get(STAGING_ENV):
            return Path(os.environ[STAGING_ENV])
        if is_local(self.master):
            return folder.parent  # the same file system as the shards: gathering one part is a rename
        return self.offline.parent / "spark-staging"

    def copy_sharded(self, sql: str, folder: Path, shards: int) -> None:
        """Write ``sql``'s rows as one Parquet file per user shard (user_id mod shards): the executors
        write a folder per shard, the driver gathers each into ``folder/shard-%05d.parquet``."""
        folder.mkdir(parents=True, exist_ok=True)
        root = self.staging_root(folder)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".spark-{folder.name}-", dir=root))
        try:
            frame = self.spark.sql(f"SELECT *, CAST(pmod(user_id, {int(shards)}) AS INT) AS shard FROM ({sql}) AS q")
            frame.write.mode("overwrite").partitionBy("shard").parquet(str(staging / "out"))
            for partition in (staging / "out").glob("shard=*"):
                gather(sorted(partition.glob("*.parquet")),
                       folder / f"shard-{int(partition.name.split('=')[1]):05d}.parquet")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def close(self) -> None:
        catalog = self.spark.catalog
        for name in self.views:
            catalog.dropTempView(name)
        self.views = []
        if self.started:
            self.spark.stop()
            return
        for key, value in self.saved.items():
            if value is None:
                self.spark.conf.unset(key)
            else:
                self.spark.conf.set(key, value)


def gather(parts: list[Path], target: Path) -> None:
    """Parquet files of one schema -> one file, a row group at a time (a rename for one file)."""
    if len(parts) == 1:
        shutil.move(parts[0], target)
        return
    writer = None
    try:
        for part in parts:
            source = pq.ParquetFile(part)
            for group in range(source.num_row_groups):
                table = source.read_row_group(group)
                if writer is None:
                    writer = pq.ParquetWriter(target, table.schema)
                writer.write_table(table)
        if writer is None and parts:  # no rows at all: the schema alone
            pq.write_table(pq.read_table(parts[0]), target)
    finally:
        if writer is not None:
            writer.close()
