"""The data side at scale: time and peak memory of every stage, from 250k to 16M interactions.

    .venv/bin/python bench/scale.py [--sizes 250k,1M,4M,16M] [--out bench/results/scale.json]
                                    [--code worktree|HEAD] [--work-dir .plexrec-bench]
                                    [--stage-timeout 900] [--max-rss-gb 10] [--stages load,...,direct]
                                    [--train-seconds 240] [--profile-train]

For each size, a synthetic impression log is generated (seeded, numpy, written in row groups,
cached under --work-dir, which git ignores): lognormal user activity (100 rows per user on
average, the busiest with thousands), Zipf item popularity, a 0/1 click label (~7% positive;
the schema's history rule is ``all`` unless --history positive), a users table (two categorical
columns) and an items table (a category and a creator), with a schema YAML the project reads.
Then each stage runs as a process of its own, timed from its start to its exit, its peak
memory the largest sum of RSS over its process tree (polled every 50 ms; or the kernel's
ru_maxrss of the process, whichever is larger):

    load          plexrec features load --schema <yaml> --data-dir <store> --history-length 100
    examples      plexrec features examples --out <work>/examples --data-dir <store>: every example
                  written as user shards of about 200k examples (what training from the store
                  builds first), DuckDB at its default memory limit (2 GB)
    examples_memory  features.training.examples_from_store(open_store("local", store), store): every
                  example in one process's memory (the quickstart's and the learner's path)
    train         plexrec train's Trainer (recsys/train.py), one epoch from the store streamed from
                  user shards (configs/quickstart.yaml's unified embedding + DARE, made small:
                  TRAIN_SMALL; data.shard_examples / data.buffer_shards as the project sets them), run
                  by this file's bounded_fit: with --train-seconds N the epoch's batch loop stops
                  after N seconds of training (the steps done, examples/s, where the time went
                  between building batches and the model's steps, and the peak RSS so far are
                  recorded; an estimate of the whole epoch is steps_per_epoch x seconds per step);
                  then, as an epoch's end does, validation, checkpoint, test and export
    train_memory  the same with data.shard_examples=0: every example in memory (the ratio of
                  examples/s and of peak RSS to the streamed train is in the JSON and the table)
    compact       plexrec features compact of 1% new events, logged after the data set's last
                  instant in batch files written by the ingester's own Ingester._log
    learn         one plexrec learn window (recsys/learn.py StreamLearner.step, from the trained
                  version, the 1% counted as learned): --window-events new events compacted,
                  their examples built from the store and learned; then the export (a version,
                  its changed item embeddings published)
    compact_full  the ratio's denominator: plexrec features compact with its own full-rebuild
                  flag where it has one, else of the whole data set logged again as new events
                  (a compaction with everything new)
    direct        (only with --stages ...,direct) the direct loader's examples from the files

The JSON also keeps each stage's own timing of its work (the examples call, the compaction
as it logs it, the learner's window, the training window): a plexrec process spends seconds
importing before it starts. The compaction goal compares the compactions' own timings; the goals
on every stage (16M in <= 8 GB, growth 4M -> 16M) judge the issue's stages, not the comparisons
(train_memory, direct); for a bounded train, growth compares its estimated stage time (the wall
time with the window replaced by the estimated epoch). --profile-train: cProfile of the train
stage's window (logs/<size>/train.prof, and its top functions in train.prof.txt).
Each stage records the machine's load average at its start and end (others share it).
--code HEAD runs the stages on an export of that commit (others may be editing the checkout
mid-run); the default runs this checkout as it is and records its modified files.

A stage that runs past --stage-timeout, or whose tree passes --max-rss-gb (or leaves the
machine under --min-available-gb), is killed and recorded with the tail of its stderr; the
stages that need it are skipped. Results: JSON (per size per stage: seconds, peak_rss_mb, rows,
ok; written after every size), a log-log plot of time and memory against rows per stage (the
JSON's name with .png), a markdown table, and the issue's goals with pass / fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CODE_ENV = "PLEXREC_SCALE_CODE"  # set for the stages: the project's code they run (--code)
CODE = Path(os.environ.get(CODE_ENV, ROOT))
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

STAGES = ("load", "examples", "examples_memory", "train", "train_memory", "compact", "learn", "compact_full",
          "direct")
DEFAULT_STAGES = STAGES[:-1]
NEEDS = {"load": [], "examples": ["load"], "examples_memory": ["load"], "train": ["load"],
         "train_memory": ["load"], "compact": ["load"], "compact_full": ["compact"], "learn": ["train", "compact"],
         "direct": []}
COMPARISONS = ("examples_memory", "train_memory", "direct")  # beside the stages: not judged by its goals
RESULT_MARK = "SCALE_RESULT "  # a stage process's own measurements: one JSON line on stdout
GENERATOR_VERSION = 1  # bump when the generator changes: cached data sets are made again
CHUNK_ROWS = 1_000_000  # rows per generated chunk (a Parquet row group); fixed, so the data depend on the seed only
T0 = 1_700_000_000  # the log's first second
SPAN = 180 * 86_400  # seconds the bulk log covers
SOURCE = "user-events@scale-bench"  # the topic incarnation the bench's event batches claim
PARTITIONS = 4
POLL_SECONDS = 0.05
HEARTBEAT_SECONDS = 30.0
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- sizes ---

def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: a number of rows, e.g. 250k, 1M, 16M or 50000")
    return int(round(float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]))


def size_label(rows: int) -> str:
    if rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows % 1_000 == 0:
        return f"{rows // 1_000}k"
    return str(rows)


# --- the data set ---

def logistic(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Population:
    """Who acts and on what: user activity, item popularity, categories and tastes (seeded)."""

    def __init__(self, rows: int, seed: int, rows_per_user: int, rows_per_item: int, sigma: float,
                 zipf: float, categories: int) -> None:
        rng = np.random.default_rng([seed, rows])
        self.num_users = max(10, rows // rows_per_user)
        self.num_items = max(100, rows // rows_per_item)
        weights = rng.lognormal(0.0, sigma, self.num_users)
        self.user_share = weights / weights.sum()
        # every user acts at least once; the rest by lognormal activity (exactly `rows` in all)
        self.user_rows = 1 + rng.multinomial(rows - self.num_users, self.user_share).astype(np.int64)
        ranks = np.arange(1, self.num_items + 1, dtype=np.float64)
        popularity = ranks ** -zipf
        self.item_cdf = np.cumsum(popularity / popularity.sum())
        self.item_by_rank = rng.permutation(self.num_items).astype(np.int64) + 1  # the most popular is no low id
        cat_weights = np.arange(1, categories + 1, dtype=np.float64) ** -0.8
        self.item_category = rng.choice(categories, self.num_items, p=cat_weights / cat_weights.sum())  # by id - 1
        self.item_creator = rng.integers(0, max(10, self.num_items // 20), self.num_items)
        self.item_bias = rng.normal(0.0, 0.5, self.num_items)
        self.user_favourite = rng.choice(categories, self.num_users, p=cat_weights / cat_weights.sum())
        self.user_bias = rng.normal(0.0, 0.5, self.num_users)
        self.user_age = rng.integers(0, 7, self.num_users)
        self.user_region = rng.integers(0, 40, self.num_users)

    def items(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.item_cdf, rng.random(n), side="right")
        return self.item_by_rank[np.minimum(ranks, self.num_items - 1)]

    def clicks(self, rng: np.random.Generator, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """~7% clicks, more often on the user's favourite category and on better items."""
        match = self.user_favourite[users - 1] == self.item_category[items - 1]
        logit = -2.9 + 1.2 * match + self.user_bias[users - 1] + self.item_bias[items - 1]
        return (rng.random(len(users)) < logistic(logit)).astype(np.int8)


def generate(rows: int, folder: Path, args: argparse.Namespace, say) -> dict:
    """The data set of ``rows`` interactions in ``folder`` (made again only when its parameters change)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    params = {"version": GENERATOR_VERSION, "rows": rows, "seed": args.seed, "rows_per_user": args.rows_per_user,
              "rows_per_item": args.rows_per_item, "sigma": args.activity_sigma, "zipf": args.zipf,
              "categories": args.categories, "history": args.history}
    meta_path = folder / "generated.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            say(f"data set {folder}: cached ({meta['rows']:,} rows, {meta['users']:,} users, {meta['items']:,} items)")
            return meta
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    pop = Population(rows, args.seed, args.rows_per_user, args.rows_per_item, args.activity_sigma, args.zipf,
                     args.categories)
    rng = np.random.default_rng([args.seed, rows, 1])
    table_schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                              ("click", pa.int8())])
    # users in chunks of about CHUNK_ROWS rows; each user's rows in time order
    bounds = np.searchsorted(np.cumsum(pop.user_rows), np.arange(CHUNK_ROWS, rows + CHUNK_ROWS, CHUNK_ROWS),
                             side="right")
    bounds = np.unique(np.concatenate([[0], np.minimum(bounds, pop.num_users), [pop.num_users]]))
    positives, written = 0, 0
    with pq.ParquetWriter(folder / "interactions.parquet", table_schema) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            users = np.repeat(np.arange(lo + 1, hi + 1, dtype=np.int64), pop.user_rows[lo:hi])
            times = T0 + rng.integers(0, SPAN, len(users), dtype=np.int64)
            order = np.lexsort((times, users))
            users, times = users[order], times[order]
            items = pop.items(rng, len(users))
            click = pop.clicks(rng, users, items)
            positives += int(click.sum())
            written += len(users)
            writer.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times, "click": click},
                                        schema=table_schema))
    assert written == rows, (written, rows)
    user_ids = np.arange(1, pop.num_users + 1, dtype=np.int64)
    pq.write_table(pa.table({"user_id": user_ids, "age_group": pop.user_age.astype(np.int64),
                             "region": np.char.add("r", pop.user_region.astype(str))}), folder / "users.parquet")
    item_ids = np.arange(1, pop.num_items + 1, dtype=np.int64)
    pq.write_table(pa.table({"item_id": item_ids, "category": np.char.add("c", pop.item_category.astype(str)),
                             "creator": pop.item_creator.astype(np.int64)}), folder / "items.parquet")
    (folder / "schema.yaml").write_text(
        f"# bench/scale.py's synthetic impression log ({rows:,} rows, seed {args.seed}); made again at will\n"
        f"name: scale-{size_label(rows)}\n"
        "path: interactions.parquet\n"
        "user: user_id\nitem: item_id\ntimestamp: timestamp\ntimestamp_unit: s\nlabel: click\n"
        f"history: {args.history}\n"
        "users:\n  path: users.parquet\n  categorical: [age_group, region]\n"
        "items:\n  path: items.parquet\n  categorical: [category, creator]\n"
        "category: category\n")
    meta = {"params": params, "rows": rows, "users": pop.num_users, "items": pop.num_items,
            "max_user_rows": int(pop.user_rows.max()), "median_user_rows": float(np.median(pop.user_rows)),
            "positive_rate": positives / rows, "first_time": T0, "last_time": T0 + SPAN - 1,
            "seconds": time.perf_counter() - started}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    say(f"data set {folder}: generated {rows:,} rows ({pop.num_users:,} users, the busiest with "
        f"{meta['max_user_rows']:,} rows; {pop.num_items:,} items; {meta['positive_rate']:.1%} clicks) "
        f"in {meta['seconds']:.1f} s")
    return meta


# --- new events, as the ingester logs them ---

def write_event_batches(folder: Path, data_dir: Path, args: argparse.Namespace, count: int, first_time: int,
                        last_time: int, offsets: dict[str, int], salt: int, files: int
                        ) -> tuple[dict[str, int], str]:
    """``count`` new events between two instants into ``files`` batch files of the store's event log,
    written by features/ingest.py ``Ingester._log`` itself; the offsets they reach, and what wrote them."""
    meta = json.loads((folder / "generated.json").read_text())
    p = meta["params"]
    pop = Population(meta["rows"], p["seed"], p["rows_per_user"], p["rows_per_item"], p["sigma"], p["zipf"],
                     p["categories"])
    rng = np.random.default_rng([args.seed, meta["rows"], 2, salt])
    users = rng.choice(pop.num_users, count, p=pop.user_rows / pop.user_rows.sum()).astype(np.int64) + 1
    items = pop.items(rng, count)
    label = pop.clicks(rng, users, items).astype(np.int64)
    times_ms = np.sort(rng.integers(first_time * 1000, last_time * 1000, count, dtype=np.int64))
    partition = users % PARTITIONS
    before = {path.name for path in (data_dir / "offline" / "events").glob("batch-*.parquet")}
    offset = np.empty(count, dtype=np.int64)
    reached = dict(offsets)
    for part in range(PARTITIONS):
        where = np.flatnonzero(partition == part)
        start = offsets.get(f"{SOURCE}/{part}", -1) + 1
        offset[where] = start + np.arange(len(where))
        if len(where):
            reached[f"{SOURCE}/{part}"] = int(start + len(where) - 1)
    log_dir = data_dir / "offline" / "events"
    log_dir.mkdir(parents=True, exist_ok=True)
    store = json.loads((data_dir / "store.json").read_text())  # what the ingester reads at start
    event_ids = [f"scale{salt:03d}{n:024x}" for n in range(count)]
    try:  # the ingester's own writer, on a stand-in for the ingester: the log's exact format
        from features.events import make_event
        from features.ingest import Ingester, Received

        stand_in = ingester_stand_in(log_dir, store, SOURCE)
        for rows in np.array_split(np.arange(count), max(1, files)):
            if len(rows):
                Ingester._log(stand_in, [Received(int(partition[n]), int(offset[n]), make_event(
                    int(users[n]), int(items[n]), 2 if label[n] else 1, event_time_ms=int(times_ms[n]),
                    event_id=event_ids[n], label=int(label[n])), int(label[n]), True) for n in rows])
        writer = "features.ingest.Ingester._log"
    except (ImportError, AttributeError, TypeError) as exc:  # its signature changed: its columns, written here
        writer = f"bench/scale.py's copy of the ingester's columns ({type(exc).__name__}: {exc})"
        for path in log_dir.glob("batch-*.parquet"):
            if path.name not in before:
                path.unlink()
        stamp = time.time_ns()
        for i, rows in enumerate(np.array_split(np.arange(count), max(1, files))):
            if len(rows):
                write_batch(log_dir, stamp + i, event_frame([event_ids[n] for n in rows], users[rows], items[rows],
                                                            label[rows], times_ms[rows], partition[rows],
                                                            offset[rows], SOURCE, store), None)
    return reached, writer


def ingester_stand_in(log_dir: Path, store: dict, source: str):
    """What ``Ingester._log`` reads of its ingester: where the log is, the topic's incarnation, the
    store's schema fingerprint (store.json, as the ingester reads it at start)."""
    from types import SimpleNamespace

    return SimpleNamespace(incarnation=source, log_dir=log_dir, meta=store,
                           schema_fingerprint=str(store.get("schema_fingerprint", "")))


def event_frame(event_ids: list[str], users: np.ndarray, items: np.ndarray, label: np.ndarray,
                times_ms: np.ndarray, partition: np.ndarray, offset: np.ndarray, source: str, store: dict):
    """Logged events as ``Ingester._log`` builds them (its columns, vectorised)."""
    import pandas as pd

    frame = pd.DataFrame({
        "event_id": event_ids,
        "user_id": users.astype(np.int64),
        "item_id": items.astype(np.int64),
        "event_type": np.where(label == 1, 2, 1).astype(np.int64),  # EVENT_TYPE_CLICK / EVENT_TYPE_IMPRESSION
        "event_timestamp": pd.to_datetime(times_ms, unit="ms", utc=True),
        "value": [None] * len(users),
        "label": label.astype(np.int64),
        "context": "{}",
        "item_attributes": "{}",
        "source": source,
        "partition": partition.astype(np.int64),
        "offset": offset.astype(np.int64),
    })
    if "schema_fingerprint" in store:
        frame["schema_fingerprint"] = store["schema_fingerprint"]
    return frame


def logged_schema(store: dict):
    """The Arrow schema of a batch file ``Ingester._log`` writes (one event logged into a scratch
    folder); None where it cannot be called."""
    import tempfile

    import pyarrow.parquet as pq

    try:
        from features.events import make_event
        from features.ingest import Ingester, Received

        with tempfile.TemporaryDirectory() as scratch:
            Ingester._log(ingester_stand_in(Path(scratch), store, SOURCE),
                          [Received(0, 0, make_event(1, 1, 2, event_time_ms=T0 * 1000, event_id="probe", label=1),
                                    1, True)])
            return pq.read_schema(next(Path(scratch).glob("batch-*.parquet")))
    except (ImportError, AttributeError, TypeError, StopIteration):
        return None


def write_batch(log_dir: Path, stamp: int, frame, schema) -> None:
    """One batch file, named and renamed into place as the ingester does; in ``schema`` (the ingester's
    own Arrow schema) where given: a column it writes that the frame lacks fails here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if schema is not None:
        missing = [name for name in schema.names if name not in table.column_names]
        if missing:
            raise RuntimeError(f"the ingester now logs column(s) {missing}: teach bench/scale.py event_frame them")
        table = table.select(schema.names).cast(schema)
    path = log_dir / f"batch-{stamp}-p{int(frame['partition'].iloc[0])}-o{int(frame['offset'].iloc[0])}.parquet"
    staging = path.with_suffix(".parquet.tmp")
    pq.write_table(table, staging)
    os.replace(staging, path)


def write_whole_log(folder: Path, data_dir: Path, args: argparse.Namespace, after: int) -> int:
    """Every row of the data set again as a new logged event (its time moved past ``after``, so the
    log spans the data set's days), in batch files of the ingester's format: what a compaction
    does when everything is new. Returns the number of files."""
    import pyarrow.parquet as pq

    store = json.loads((data_dir / "store.json").read_text())
    schema = logged_schema(store)
    log_dir = data_dir / "offline" / "events"
    log_dir.mkdir(parents=True, exist_ok=True)
    source = SOURCE + "-whole"
    next_offset = np.zeros(PARTITIONS, dtype=np.int64)
    per_file = max(args.batch_events, 50_000)
    stamp, files, first_id = time.time_ns(), 0, 0
    interactions = pq.ParquetFile(folder / "interactions.parquet")
    for group in range(interactions.num_row_groups):
        chunk = interactions.read_row_group(group, columns=["user_id", "item_id", "timestamp", "click"])
        for lo in range(0, chunk.num_rows, per_file):
            part = chunk.slice(lo, per_file)
            users = part.column("user_id").to_numpy()
            times_ms = (part.column("timestamp").to_numpy() - T0 + after) * 1000
            partition = users % PARTITIONS
            offset = np.empty(len(users), dtype=np.int64)
            for p in range(PARTITIONS):
                where = np.flatnonzero(partition == p)
                offset[where] = next_offset[p] + np.arange(len(where))
                next_offset[p] += len(where)
            ids = [f"whole{n:027x}" for n in range(first_id, first_id + len(users))]
            first_id += len(users)
            write_batch(log_dir, stamp + files, event_frame(
                ids, users, part.column("item_id").to_numpy(), part.column("click").to_numpy(), times_ms,
                partition, offset, source, store), schema)
            files += 1
    return files


# --- running a stage ---

def tree(root: int) -> list[int]:
    """The process and its descendants (the kernel's children lists of every thread)."""
    pids, i = [root], 0
    while i < len(pids):
        pid = pids[i]
        i += 1
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as file:
                    pids.extend(int(child) for child in file.read().split())
        except OSError:
            continue
    return pids


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as file:
                total += int(file.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def available_bytes() -> int:
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def kill_tree(pid: int) -> None:
    """SIGKILL the stage's process group, and any descendant that left it."""
    members = tree(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for member in members:
        try:
            os.kill(member, signal.SIGKILL)
        except OSError:
            pass


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def run_stage(name: str, command: list[str], logs: Path, args: argparse.Namespace, env: dict, say) -> dict:
    """Run one stage as a process of its own; wall time, peak RSS of its tree, what it reported."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    limit = args.max_rss_gb * 1024 ** 3
    floor = args.min_available_gb * 1024 ** 3
    say(f"  {name}: {' '.join(command)}")
    load_before = os.getloadavg()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=env[CODE_ENV], env=env,
                                   start_new_session=True)
        peak, status, rusage, reason = 0, None, None, None
        next_heartbeat = started + HEARTBEAT_SECONDS
        while True:
            pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                status, rusage = wait_status, usage
                break
            current = rss_bytes(tree(process.pid))
            peak = max(peak, current)
            now = time.perf_counter()
            if reason is None:
                if now - started > args.stage_timeout:
                    reason = "timeout"
                elif current > limit:
                    reason = f"killed: its processes passed --max-rss-gb {args.max_rss_gb:g}"
                elif available_bytes() < floor:
                    reason = f"killed: the machine had under --min-available-gb {args.min_available_gb:g} left"
                if reason:
                    say(f"  {name}: {reason} after {now - started:.0f} s at {current / MB:,.0f} MB; killing it")
                    kill_tree(process.pid)
            if now >= next_heartbeat:
                last = re.sub(r"^\d{4}-\d\d-\d\d [0-9:,]+ ", "", tail(err_path, 1).strip())[:120]
                say(f"  {name}: {now - started:5.0f} s, {current / MB:,.0f} MB now, {peak / MB:,.0f} MB peak"
                    + (f" | {last}" if last else ""))
                next_heartbeat = now + HEARTBEAT_SECONDS
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    kill_tree(process.pid)  # a daemon it left behind would skew the next stage
    peak = max(peak, rusage.ru_maxrss * 1024)
    result = {"ok": process.returncode == 0 and reason is None, "status": reason or (
        "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"),
        "seconds": round(seconds, 3), "peak_rss_mb": round(peak / MB, 1),
        "cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 2),
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]}}
    stdout = out_path.read_text(errors="replace")
    reported = [line[len(RESULT_MARK):] for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if reported:
        result["detail"] = json.loads(reported[-1])
    if not result["ok"]:
        result["stderr_tail"] = tail(err_path)
    result["logs"] = str(logs / name) + ".{out,err}"
    say(f"  {name}: {result['status']}, {seconds:.1f} s, peak {peak / MB:,.0f} MB"
        + (f"\n{indent(result['stderr_tail'])}" if result.get("stderr_tail") else ""))
    return result


def indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def plexrec() -> list[str]:
    script = Path(sys.executable).parent / "plexrec"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "plexrec.cli"]


# the quickstart's model made small: an epoch over millions of rows on two cores is the data side's
# test, not the model's (configs/quickstart.yaml: dim 16, top_k 32, batches of 512)
TRAIN_SMALL = {"embedding": {"dim": 8}, "sequence": {"mode": "dare", "top_k": 16, "attention_dim": 8},
               "model": {"mlp": [32, 16]}, "train": {"batch_size": 4096}}


def train_config(path: Path, schema: Path, store: Path, run_dir: Path, args: argparse.Namespace,
                 data: dict | None = None) -> Path:
    """configs/quickstart.yaml (unified embedding + DARE, split in time) made small (TRAIN_SMALL), on the
    bench's store, one epoch; ``data``: more data settings (train_memory: shard_examples 0); then
    --train-set's settings."""
    import yaml

    config = yaml.safe_load((args.code_root / "configs" / "quickstart.yaml").read_text())
    config.setdefault("data", {}).update({"schema": str(schema), "source": "feast", "store_dir": str(store),
                                          "max_history": args.history_length, **(data or {})})
    config.setdefault("train", {}).update({"epochs": 1, "out_dir": str(run_dir), **TRAIN_SMALL["train"]})
    for section in ("embedding", "sequence", "model"):
        config.setdefault(section, {}).update(TRAIN_SMALL[section])
    for setting in args.train_set:  # as plexrec train's --set: section.key=value, the value as YAML
        key, _, value = setting.partition("=")
        section, _, field = key.partition(".")
        if not field:
            raise SystemExit(f"--train-set {setting!r}: use section.key=value")
        config.setdefault(section, {})[field] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def full_rebuild_flag(env: dict) -> str | None:
    """`plexrec features compact`'s own flag to rebuild everything, where it has one."""
    text = subprocess.run([*plexrec(), "features", "compact", "--help"], capture_output=True, text=True,
                          cwd=env[CODE_ENV], env=env).stdout
    for flag in ("--full", "--rebuild", "--full-rebuild"):
        if re.search(rf"{flag}\b", text):
            return flag
    return None


def compaction_seconds(err_path: Path) -> float | None:
    """The compaction's own time, from its log line ("event log of ...; 1.2 s")."""
    found = re.findall(r"event log of .*?([0-9.]+) s\s*$", tail(err_path, 200), flags=re.M)
    return float(found[-1]) if found else None


def prepare_stage(name: str, rows: int, meta: dict, data: Path, store: Path, run_dir: Path,
                  logs: Path, env: dict, args: argparse.Namespace, learn_offsets: dict[str, int]
                  ) -> tuple[list[str], dict]:
    """A stage's command, and what the report says about its input (``offsets``: the event log's, for
    the learner); writes the new events the compaction and the learner take."""
    schema = data / "schema.yaml"
    me = [sys.executable, str(Path(__file__).resolve())]
    one_percent = max(1, rows // 100)
    extra: dict = {}
    if name == "load":
        command = [*plexrec(), "features", "load", "--schema", str(schema), "--data-dir", str(store),
                   "--history-length", str(args.history_length)]
        extra["rows"] = rows
    elif name == "examples":
        command = [*plexrec(), "features", "examples", "--out", str(examples_dir(run_dir)),
                   "--data-dir", str(store)]
        extra["rows"] = rows
    elif name == "examples_memory":
        command = [*me, "--stage", "examples", "--data-dir", str(store)]
    elif name in ("train", "train_memory"):  # the memory variant's run beside the streamed one's (learn reads that)
        config = train_config(logs / f"{name}.yaml", schema, store,
                              run_dir if name == "train" else memory_run_dir(run_dir), args,
                              {"shard_examples": 0} if name == "train_memory" else None)
        command = [*me, "--stage", "train", "--config", str(config)]
        if args.train_seconds:
            command += ["--train-seconds", str(args.train_seconds)]
        if args.profile_train and name == "train":
            command += ["--profile", str(logs / "train.prof")]
    elif name == "compact":
        later = meta["last_time"] + 1
        files = max(1, one_percent // args.batch_events)
        extra["offsets"], extra["event_writer"] = write_event_batches(
            data, store, args, one_percent, later, later + SPAN // 100, {}, salt=1, files=files)
        command = [*plexrec(), "features", "compact", "--data-dir", str(store)]
        extra.update({"rows": one_percent, "batch_files": files})
    elif name == "compact_full":
        method = full_rebuild_flag(env)
        command = [*plexrec(), "features", "compact", "--data-dir", str(store)]
        if method:
            command.append(method)
            extra.update({"rows": rows + one_percent + args.window_events, "forced_by": method})
        else:  # no such flag: a compaction of a log as large as the data set, all of it new
            later = meta["last_time"] + 1 + SPAN // 100 + 1 + 86_400
            files = write_whole_log(data, store, args, later)
            extra.update({"rows": rows, "batch_files": files, "forced_by": "the whole data set logged as new events"})
    elif name == "learn":
        later = meta["last_time"] + 1 + SPAN // 100 + 1
        _, extra["event_writer"] = write_event_batches(
            data, store, args, args.window_events, later, later + 600, learn_offsets, salt=2,
            files=max(1, args.window_events // args.batch_events))
        command = [*me, "--stage", "learn", "--data-dir", str(store), "--model-dir", str(run_dir / "models"),
                   "--offsets", json.dumps(learn_offsets)]
        extra["rows"] = args.window_events
    else:  # direct
        command = [*me, "--stage", "direct", "--schema", str(schema)]
    return command, extra


def memory_run_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + "-memory")


def examples_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + "-examples")


def project_code(code: str, work: Path, say) -> tuple[Path, dict]:
    """Where the stages' code lives: this checkout as it is, or an export of a commit (--code HEAD:
    others may be editing the checkout while the bench runs)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()

    if code == "worktree":
        modified = [line[3:] for line in git("status", "--porcelain", "--", "features", "recsys", "serving",
                                             "protos", "configs").splitlines()]
        return ROOT, {"source": "worktree", "commit": git("rev-parse", "HEAD"), "modified": modified}
    commit = git("rev-parse", "--verify", f"{code}^{{commit}}")
    folder = work / "code" / commit[:12]
    if not (folder / "recsys" / "cli.py").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    say(f"code: {code} = {commit[:12]}, exported to {folder}")
    return folder, {"source": code, "commit": commit, "subject": git("log", "-1", "--format=%s", commit)[:200]}


def measure_size(rows: int, args: argparse.Namespace, say) -> dict:
    label = size_label(rows)
    work = Path(args.work_dir).resolve()
    data = work / "data" / label
    say(f"== {label}: {rows:,} rows ==")
    meta = generate(rows, data, args, say)
    store, run_dir, logs = work / "store" / label, work / "run" / label, work / "logs" / label
    for folder in (store, run_dir, memory_run_dir(run_dir), examples_dir(run_dir), logs):
        shutil.rmtree(folder, ignore_errors=True)
    store.mkdir(parents=True)
    logs.mkdir(parents=True)
    env = {**os.environ, "PLEXREC_DATA_DIR": str(store), "PYTHONUNBUFFERED": "1", CODE_ENV: str(args.code_root)}
    if args.code_root != ROOT:  # a snapshot of a commit: its packages before the editable install's
        env["PYTHONPATH"] = os.pathsep.join([str(args.code_root), *filter(None, [os.environ.get("PYTHONPATH")])])
    stages: dict[str, dict] = {}
    learn_offsets: dict[str, int] = {}
    for name in args.stages:
        missing = [need for need in NEEDS[name] if need in args.stages and not stages.get(need, {}).get("ok")]
        missing += [need for need in NEEDS[name] if need not in args.stages]
        if missing:
            stages[name] = {"ok": False, "status": f"skipped: needs {', '.join(missing)}"}
            say(f"  {name}: {stages[name]['status']}")
            continue
        try:
            command, extra = prepare_stage(name, rows, meta, data, store, run_dir, logs, env, args,
                                           learn_offsets)
        except Exception as exc:  # noqa: BLE001 - a stage that cannot even be set up is a failed stage
            stages[name] = {"ok": False, "status": f"failed before it ran: {type(exc).__name__}: {exc}"}
            say(f"  {name}: {stages[name]['status']}")
            continue
        learn_offsets = extra.pop("offsets", learn_offsets)
        result = run_stage(name, command, logs, args, env, say)
        result.update({k: v for k, v in extra.items() if k not in result})
        if name in ("compact", "compact_full"):
            result["compaction_seconds"] = compaction_seconds(logs / f"{name}.err")
        if name in ("train", "train_memory"):
            result.update(train_summary(result.get("detail") or {}, logs / f"{name}.err"))
        if "detail" in result and "rows" in result["detail"]:
            result["rows"] = result["detail"]["rows"]
        stages[name] = result
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(memory_run_dir(run_dir), ignore_errors=True)
    return {"rows": rows, "users": meta["users"], "items": meta["items"], "max_user_rows": meta["max_user_rows"],
            "median_user_rows": meta["median_user_rows"], "positive_rate": round(meta["positive_rate"], 4),
            "stages": stages}


def train_summary(detail: dict, err_path: Path) -> dict:
    """The train stage's examples, training window, epoch estimate and AUCs (what it reported; else,
    for a stage that did not finish, its log's example counts)."""
    summary: dict = {}
    counts = re.findall(r"(\d+) train / (\d+) valid / (\d+) test examples", tail(err_path, 400))
    if counts:
        train, valid, test = map(int, counts[-1])
        summary.update({"rows": train + valid + test, "train_examples": train})
    built = re.findall(r"examples from the store.* in ([0-9.]+) s\s*$", tail(err_path, 400), flags=re.M)
    if built:
        summary["examples_build_seconds"] = float(built[-1])
    for key in ("train_examples", "setup_seconds", "window", "epoch_estimate_seconds", "after_window_seconds",
                "test_auc", "valid_auc"):
        if key in detail:
            summary[key] = detail[key]
    return summary


def stage_seconds_estimate(stage: dict) -> float:
    """A train stage's wall time with its bounded window replaced by the estimated whole epoch."""
    window = stage.get("window") or {}
    if window.get("stopped") and stage.get("epoch_estimate_seconds"):
        return stage["seconds"] - window["seconds"] + stage["epoch_estimate_seconds"]
    return stage["seconds"]


# --- the stages this file runs itself ---

def stage_examples(args: argparse.Namespace) -> None:
    from features.store import open_store
    from features.training import examples_from_store
    from recsys.logs import configure_logging

    configure_logging()
    started = time.perf_counter()
    store = open_store("local", args.data_dir)
    opened = time.perf_counter()
    examples = examples_from_store(store, args.data_dir)
    seconds = time.perf_counter() - opened
    rows = len(examples) if hasattr(examples, "__len__") else getattr(examples, "num_rows", None)
    print(RESULT_MARK + json.dumps({"rows": rows, "call_seconds": round(seconds, 3),
                                    "open_store_seconds": round(opened - started, 3)}), flush=True)


def peak_rss_mb() -> tuple[float, float]:
    """(this process's peak RSS so far, its RSS now), MB (/proc/self/status VmHWM, VmRSS)."""
    found = {}
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(("VmHWM:", "VmRSS:")):
                found[line[:5]] = int(line.split()[1]) / 1024
    return round(found.get("VmHWM", 0.0), 1), round(found.get("VmRSS", 0.0), 1)


def bounded_fit(config, budget: float | None, profile: Path | None = None) -> dict:
    """recsys/train.py's Trainer.fit, its epoch's batch loop stopped after ``budget`` seconds of training
    (None: the whole epoch): Trainer.batches is wrapped, so the steps taken are the Trainer's own
    (train_epoch -> train_step); after the last step in the budget the epoch counts as ended and fit goes
    on as after an epoch (validation, checkpoint, test, export). Returns the window's measurements:
    steps, examples, seconds, the seconds spent drawing batches (``data_seconds``: the examples
    stream and make_batch) and in the steps (``step_seconds``: forward, backward, optimisers), peak
    RSS so far. ``profile``: cProfile of the window written there (and its top functions in .txt)."""
    import cProfile
    import pstats

    from recsys.train import Trainer

    log = __import__("logging").getLogger("plexrec.bench")
    window: dict = {}

    class BoundedTrainer(Trainer):
        def batches(self):
            source = super().batches()
            profiler = cProfile.Profile() if profile else None
            steps = examples = 0
            data_seconds = 0.0
            stopped = False
            started = time.perf_counter()
            next_note = started + 30
            if profiler:
                profiler.enable()
            try:
                while True:
                    drawing = time.perf_counter()
                    batch = next(source, None)
                    data_seconds += time.perf_counter() - drawing
                    if batch is None:
                        break
                    yield batch  # the Trainer's train_step runs here
                    steps += 1
                    examples += len(batch)
                    now = time.perf_counter()
                    elapsed = now - started
                    if now >= next_note:
                        next_note = now + 30
                        log.info("training window: %d steps of %d, %.0f examples/s, %.0f%% drawing batches, "
                                 "peak RSS %.0f MB", steps, self.steps_per_epoch, examples / elapsed,
                                 100 * data_seconds / elapsed, peak_rss_mb()[0])
                    if budget and elapsed >= budget and self.step_in_epoch:
                        stopped = True
                        break
            finally:
                if profiler:
                    profiler.disable()
                source.close()
            seconds = time.perf_counter() - started
            peak, now = peak_rss_mb()
            window.update({"budget_seconds": budget, "stopped": stopped, "steps": steps,
                           "steps_per_epoch": self.steps_per_epoch,
                           "examples": examples, "seconds": round(seconds, 3),
                           "data_seconds": round(data_seconds, 3), "step_seconds": round(seconds - data_seconds, 3),
                           "examples_per_second": round(examples / seconds, 1) if seconds else None,
                           "peak_rss_mb_so_far": peak, "rss_mb_at_stop": now})
            log.info("training window: %s", json.dumps(window))
            if stopped:  # the epoch ends here: fit validates, checkpoints, tests and exports as after an epoch
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if profiler:
                profiler.dump_stats(str(profile))
                with open(f"{profile}.txt", "w") as text:
                    stats = pstats.Stats(profiler, stream=text)
                    stats.sort_stats("cumulative").print_stats(60)
                    stats.sort_stats("tottime").print_stats(40)

    started = time.perf_counter()
    trainer = BoundedTrainer(config)
    built = time.perf_counter()
    final = trainer.fit(progress=False)
    done = time.perf_counter()
    train_examples = len(trainer.train_examples)
    detail = {"rows": train_examples + sum(len(part) for part in trainer.eval_examples.values()),
              "train_examples": train_examples, "setup_seconds": round(built - started, 3), "window": window,
              "after_window_seconds": round(done - built - window.get("seconds", 0.0), 3),
              "test_auc": round(final["test"]["auc"], 4),
              "valid_auc": round((final.get("valid") or {}).get("valid_auc", float("nan")), 4)}
    if window.get("steps"):
        per_step = window["seconds"] / window["steps"]
        detail["epoch_estimate_seconds"] = round(per_step * window["steps_per_epoch"], 1)
    return detail


def stage_train(args: argparse.Namespace) -> None:
    """The train and train_memory stages: a config's Trainer, its epoch bounded by --train-seconds."""
    import torch.distributed as dist

    from recsys.logs import configure_logging
    from recsys.config import load_config

    configure_logging()
    detail = bounded_fit(load_config(args.config, {}), args.train_seconds,
                         Path(args.profile) if args.profile else None)
    print(RESULT_MARK + json.dumps(detail), flush=True)
    dist.destroy_process_group()


def stage_direct(args: argparse.Namespace) -> None:
    from recsys.logs import configure_logging
    from features.examples import SplitRule, build_examples
    from features.schema import DatasetSchema
    from features.datasets import read_tables

    configure_logging()
    started = time.perf_counter()
    schema = DatasetSchema.from_yaml(args.schema)
    examples = build_examples(read_tables(schema).joined(), schema, SplitRule(kind="time"))
    print(RESULT_MARK + json.dumps({"rows": len(examples), "call_seconds": round(time.perf_counter() - started, 3)}),
          flush=True)


def stage_learn(args: argparse.Namespace) -> None:
    """One window of `plexrec learn` (recsys/learn.py StreamLearner.step: compact, the events past its
    offsets, their examples from the store, learn) and the export that follows it (a version, its
    changed embeddings published), starting at ``--offsets``: the 1% events count as learned."""
    import torch

    from recsys.logs import configure_logging
    from recsys.learn import LearnConfig, StreamLearner

    configure_logging()
    torch.set_num_threads(1)  # plexrec learn's default
    started = time.perf_counter()
    learner = StreamLearner(LearnConfig(model_dir=args.model_dir, data_dir=args.data_dir, export_seconds=1e9,
                                        export_events=10 ** 9))
    learner.offsets = {str(k): int(v) for k, v in json.loads(args.offsets).items()}
    opened = time.perf_counter()
    learned = learner.step()
    stepped = time.perf_counter()
    version = learner.export()
    exported = time.perf_counter()
    print(RESULT_MARK + json.dumps({"rows": learned, "open_seconds": round(opened - started, 3),
                                    "window_seconds": round(stepped - opened, 3),
                                    "export_seconds": round(exported - stepped, 3),
                                    "published": learner.stats.published,
                                    "version": version.name if version else None}), flush=True)


# --- the report ---

GOALS = [  # (name, text)
    ("examples_1M", "1M rows: examples from the store <= 45 s and <= 2 GB"),
    ("examples_4M", "4M rows: examples from the store <= 120 s and <= 4 GB"),
    ("all_16M", "16M rows: every stage completes in <= 8 GB"),
    ("growth_4M_16M", "4M -> 16M rows: time of every stage grows <= 4.5x"),
    ("compaction_1pct", "a compaction of 1% new events costs <= 5% of a full rebuild (largest size)"),
]


def goal_checks(results: dict[str, dict]) -> list[dict]:
    by_rows = {r["rows"]: r for r in results.values()}
    checks = []

    def stage(rows: int, name: str) -> dict | None:
        return by_rows.get(rows, {}).get("stages", {}).get(name)

    for key, rows, seconds, gb in (("examples_1M", 1_000_000, 45, 2), ("examples_4M", 4_000_000, 120, 4)):
        s = stage(rows, "examples")
        if s is None or "seconds" not in s:
            checks.append({"goal": key, "passed": None, "measured": "not measured"})
        else:
            passed = s["ok"] and s["seconds"] <= seconds and s["peak_rss_mb"] <= gb * 1024
            checks.append({"goal": key, "passed": passed,
                           "measured": f"{s['status']}: {s['seconds']:.1f} s, {s['peak_rss_mb'] / 1024:.2f} GB"})
    big = by_rows.get(16_000_000)
    if big is None:
        checks.append({"goal": "all_16M", "passed": None, "measured": "not measured"})
    else:
        stages = {n: s for n, s in big["stages"].items() if n not in COMPARISONS}
        worst = max((s.get("peak_rss_mb", 0) for s in stages.values()), default=0)
        failed = [n for n, s in stages.items() if not s["ok"]]
        measured = f"peak {worst / 1024:.2f} GB" + (f"; not ok: {', '.join(failed)}" if failed else "")
        checks.append({"goal": "all_16M", "passed": not failed and worst <= 8 * 1024, "measured": measured})
    if 4_000_000 in by_rows and 16_000_000 in by_rows:
        ratios, passed = {}, True
        for name, s16 in by_rows[16_000_000]["stages"].items():
            if name in COMPARISONS:
                continue
            s4 = stage(4_000_000, name)
            if s4 and s4.get("ok") and s16.get("ok"):  # a bounded train: its estimated time with the whole epoch
                ratios[name] = stage_seconds_estimate(s16) / stage_seconds_estimate(s4)
                passed &= ratios[name] <= 4.5
            else:
                passed = False
        checks.append({"goal": "growth_4M_16M", "passed": passed,
                       "measured": ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()) or "stages failed"})
    else:
        checks.append({"goal": "growth_4M_16M", "passed": None, "measured": "not measured"})
    ratios = []
    for label, r in results.items():
        one, full = r["stages"].get("compact"), r["stages"].get("compact_full")
        if one and full and one.get("ok") and full.get("ok"):
            a, b = one.get("compaction_seconds"), full.get("compaction_seconds")
            if not a or not b:  # no log line: the processes' wall time
                a, b = one["seconds"], full["seconds"]
            ratios.append((r["rows"], label, a / b))
    if ratios:
        rows, label, ratio = max(ratios)
        checks.append({"goal": "compaction_1pct", "passed": ratio <= 0.05,
                       "measured": ", ".join(f"{lb} {x:.1%}" for _, lb, x in sorted(ratios)) + f" (judged at {label})"})
    else:
        checks.append({"goal": "compaction_1pct", "passed": None, "measured": "not measured"})
    texts = dict(GOALS)
    for check in checks:
        check["text"] = texts[check["goal"]]
    return checks


def train_comparison(results: dict[str, dict]) -> dict[str, dict]:
    """Per size, streamed (train) against in-memory (train_memory) training: examples/s and peak RSS
    (of the training window so far, and of the whole stage's process tree), and their ratios."""
    compared = {}
    for label, r in results.items():
        a, b = r["stages"].get("train"), r["stages"].get("train_memory")
        if not a or not b or "seconds" not in a or "seconds" not in b:
            continue
        row: dict = {"streamed_ok": a["ok"], "memory_ok": b["ok"], "memory_status": b["status"]}
        wa, wb = a.get("window") or {}, b.get("window") or {}
        if wa.get("examples_per_second") and wb.get("examples_per_second"):
            row.update({"streamed_examples_per_second": wa["examples_per_second"],
                        "memory_examples_per_second": wb["examples_per_second"],
                        "examples_per_second_ratio": round(wa["examples_per_second"] / wb["examples_per_second"], 3)})
        if wa.get("peak_rss_mb_so_far") and wb.get("peak_rss_mb_so_far"):
            row.update({"streamed_window_peak_mb": wa["peak_rss_mb_so_far"],
                        "memory_window_peak_mb": wb["peak_rss_mb_so_far"],
                        "window_peak_rss_ratio": round(wa["peak_rss_mb_so_far"] / wb["peak_rss_mb_so_far"], 3)})
        row.update({"streamed_stage_peak_mb": a["peak_rss_mb"], "memory_stage_peak_mb": b["peak_rss_mb"],
                    "stage_peak_rss_ratio": round(a["peak_rss_mb"] / b["peak_rss_mb"], 3),
                    "streamed_setup_seconds": a.get("setup_seconds"), "memory_setup_seconds": b.get("setup_seconds")})
        compared[label] = row
    return compared


def cell(stage: dict | None) -> str:
    if not stage:
        return "—"
    if "seconds" not in stage:
        return "skipped"
    text = f"{stage['seconds']:,.1f} s, {stage['peak_rss_mb']:,.0f} MB"
    window = stage.get("window") or {}
    inner = stage.get("compaction_seconds") or (stage.get("detail") or {}).get("call_seconds") \
        or (stage.get("detail") or {}).get("window_seconds") or stage.get("epoch_seconds")
    if window.get("steps") and stage["ok"]:
        text += (f" ({window['seconds']:,.0f} s: {window['steps']:,} of {window['steps_per_epoch']:,} steps, "
                 f"{window['examples_per_second']:,.0f} ex/s, {window['peak_rss_mb_so_far']:,.0f} MB; "
                 f"epoch est. {stage.get('epoch_estimate_seconds', 0):,.0f} s)")
    elif inner is not None and stage["ok"]:
        text += f" ({inner:,.1f} s)"
    return text if stage["ok"] else f"{stage['status'].split(':')[0]} ({text})"


def print_tables(results: dict[str, dict], stages: list[str], checks: list[dict]) -> None:
    labels = list(results)
    print("\nwall time of the stage's process, peak RSS of its tree (in brackets: the work itself, as the stage "
          "logs it: the examples call, the compaction, the learner's window; for training, its window: seconds, "
          "steps, examples/s, peak RSS so far, the whole epoch estimated)")
    print("\n| stage | " + " | ".join(f"{lb} rows" for lb in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name in stages:
        print(f"| {name} | " + " | ".join(cell(results[lb]["stages"].get(name)) for lb in labels) + " |")
    print("| (users, busiest user's rows) | " + " | ".join(
        f"{results[lb]['users']:,}, {results[lb]['max_user_rows']:,}" for lb in labels) + " |")
    compared = train_comparison(results)
    if compared:
        print("\n| streamed / in-memory training | examples/s | ratio | window peak RSS MB | ratio | "
              "stage peak RSS MB | ratio |")
        print("|---|---|---|---|---|---|---|")
        for label, row in compared.items():
            speed = (f"{row['streamed_examples_per_second']:,.0f} / {row['memory_examples_per_second']:,.0f}"
                     if "examples_per_second_ratio" in row else "—")
            window = (f"{row['streamed_window_peak_mb']:,.0f} / {row['memory_window_peak_mb']:,.0f}"
                      if "window_peak_rss_ratio" in row else "—")
            memory = "" if row["memory_ok"] else f" (in memory: {row['memory_status'].split(':')[0]})"
            print(f"| {label} rows{memory} | {speed} | {row.get('examples_per_second_ratio', '—')} | {window} | "
                  f"{row.get('window_peak_rss_ratio', '—')} | {row['streamed_stage_peak_mb']:,.0f} / "
                  f"{row['memory_stage_peak_mb']:,.0f} | {row['stage_peak_rss_ratio']} |")
    print("\n| goal | measured | result |")
    print("|---|---|---|")
    for check in checks:
        verdict = {True: "pass", False: "**fail**", None: "not measured"}[check["passed"]]
        print(f"| {check['text']} | {check['measured']} | {verdict} |")


def plot(results: dict[str, dict], stages: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in stages:
        points = [(r["rows"], r["stages"][name]) for r in results.values()
                  if r["stages"].get(name, {}).get("ok")]
        if not points:
            continue
        x = [p[0] for p in points]
        bounded = any((p[1].get("window") or {}).get("stopped") for p in points)
        ax_time.plot(x, [stage_seconds_estimate(p[1]) for p in points], "o-",  # a bounded train: its whole epoch
                     label=f"{name} (epoch est.)" if bounded else name)
        ax_mem.plot(x, [p[1]["peak_rss_mb"] / 1024 for p in points], "o-", label=name)
    for ax, title, unit in ((ax_time, "wall time", "seconds"), (ax_mem, "peak RSS (process tree)", "GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: size_label(int(round(value)))))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        ax.set_xticks(sorted(r["rows"] for r in results.values()))
        ax.set_xlabel("interactions (rows)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    for ax in (ax_time, ax_mem):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("bench/scale.py: the data side against the number of interactions")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250k,1M,4M,16M", help="interactions per data set, comma-separated")
    parser.add_argument("--out", default="bench/results/scale.json")
    parser.add_argument("--work-dir", default=".plexrec-bench", help="data sets (kept, reused), stores, logs")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma-separated, in order, of {', '.join(STAGES)}")
    parser.add_argument("--stage-timeout", type=float, default=900.0, help="seconds before a stage is killed")
    parser.add_argument("--max-rss-gb", type=float, default=10.0, help="a stage's process tree is killed above it")
    parser.add_argument("--min-available-gb", type=float, default=2.0,
                        help="a stage is killed when the machine's available memory falls under it")
    parser.add_argument("--history-length", type=int, default=100, help="behaviours kept per user (load, train)")
    parser.add_argument("--history", choices=["all", "positive"], default="all", help="the schema's history rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-user", type=int, default=100)
    parser.add_argument("--rows-per-item", type=int, default=100)
    parser.add_argument("--activity-sigma", type=float, default=1.0, help="lognormal sigma of user activity")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of item popularity")
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--window-events", type=int, default=1000, help="new events in the learner's window")
    parser.add_argument("--batch-events", type=int, default=5000, help="events per logged batch file")
    parser.add_argument("--train-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of the train stages' config, as plexrec train --set takes it (repeatable)")
    parser.add_argument("--code", default="worktree",
                        help="the project code the stages run: worktree (this checkout as it is) or a commit "
                             "(e.g. HEAD), exported under --work-dir/code")
    parser.add_argument("--train-seconds", type=float,
                        help="stop the train stages' epoch after this many seconds of training (default: the "
                             "whole epoch); steps, examples/s and peak RSS so far are recorded, the epoch estimated")
    parser.add_argument("--profile-train", action="store_true",
                        help="cProfile the train stage's training window (logs/<size>/train.prof and .prof.txt)")
    parser.add_argument("--keep", action="store_true", help="keep each size's store and run (default: removed)")
    parser.add_argument("--stage", choices=["examples", "learn", "direct", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--offsets", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        {"examples": stage_examples, "learn": stage_learn, "direct": stage_direct,
         "train": stage_train}[args.stage](args)
        return

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose among {', '.join(STAGES)}")
    from common import machine, now, write_json

    bench_started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - bench_started:7.1f} s] {text}", flush=True)

    out = Path(args.out)
    args.code_root, code = project_code(args.code, Path(args.work_dir).resolve(), say)
    if args.code_root != ROOT:  # this process writes event batches with the ingester's code: that one's
        sys.path.insert(0, str(args.code_root))
    report = {"benchmark": "scale", "measured_at": now(), "machine": machine(), "cpus": os.cpu_count(), "code": code,
              "settings": {k: getattr(args, k) for k in ("stages", "stage_timeout", "max_rss_gb", "history_length",
                                                          "history", "seed", "rows_per_user", "rows_per_item",
                                                          "activity_sigma", "zipf", "categories", "window_events",
                                                          "batch_events", "train_set", "train_seconds",
                                                          "profile_train")},
              "measure": "seconds: a stage process's wall time, start to exit; peak_rss_mb: the largest sum of RSS "
                         "over its process tree (polled every 50 ms) or its ru_maxrss; rows: what it processed",
              "results": {}}
    for rows in sizes:
        report["results"][size_label(rows)] = measure_size(rows, args, say)
        report["goals"] = goal_checks(report["results"])
        report["train_streamed_vs_memory"] = train_comparison(report["results"])
        write_json(out, report)
    plot(report["results"], args.stages, out.with_suffix(".png"))
    print_tables(report["results"], args.stages, report["goals"])


if __name__ == "__main__":
    main()
