"""`plexrec learn`: the served model follows the stream.

    plexrec learn --model-dir runs/ml100k_sequence/models [--data-dir .plexrec]
                  [--export-seconds 10] [--export-events 5000] [--poll-seconds 2] [--keep-versions 10]

A loop, every ``--poll-seconds``:

  1. compact the ingester's event log (features/event_log.py): the views now hold every
     streamed behaviour at its instant
  2. take the label events past the learner's offsets (one per event id, in event-time
     order, none that the bulk load already holds) and build their examples point in
     time from the offline store, as training does (features/training.py): each with
     the features it had just before it happened
  3. learn them, oldest first (recsys/continual.py: the version's checkpoint, its optimizer
     state included)
  4. every ``--export-seconds`` or ``--export-events`` learned: a new version under
     ``--model-dir``, which ``plexrec serve`` picks up by itself, carrying its checkpoint
     (weights, optimizer state and the offsets learned up to; one directory written whole);
     then the items whose embeddings changed are published tagged with that version
     (serving uses them, features/online.py)

One lineage: the learner follows the served model. It continues from the newest version in
the models root (the one serving picks) and looks again at every step: a version that is not
its own (a `plexrec train` into the same run exported it) or the disappearance of the version
it descends from (an operator rolled back by deleting the newest versions) makes it drop what
it learned since and continue from that version: its weights and optimizer state (its
``checkpoint/``), and as stream position its offsets if a learner exported it, else the events
up to the newest example of its training data (``data_until`` in its manifest) count as
learned. Each export's manifest names the version it descends from (``base_version``). As
checkpoints live only inside versions, a removed lineage cannot be exported again.

Crash-safe: the offsets live in the version with the weights that learned up to them. After
a kill the job continues from the newest version and takes the events after its offsets:
what it learned since that version died with the process and is learned again, so every
event is learned once by the model that survives (tests/test_learn.py kills it with SIGKILL).
One learner per run directory: it holds ``<run>/learn.lock``; a second one exits naming the
first's pid. On SIGINT / SIGTERM it finishes the window, exports what it learned since the
last version, and stops.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from features.durable import HeldByAnother, hold_exclusive
from features.event_log import (
    compact_event_log,
    event_times,
    events_after,
    last_offsets,
    read_event_log,
)
from features.publish import PublishedEmbeddings, prune_item_embeddings
from features.store import StoreError, data_dir, open_store, read_store_meta, stored_schema
from features.training import examples_from_store
from recsys.config import RunConfig
from recsys.continual import CONTINUAL_DIR, EXPORT_STAGING, ContinualLearner, checkpoint_of
from recsys.export import (
    MANIFEST_FILE,
    ModelArtifactError,
    read_manifest,
    version_directories,
)
from recsys.item_embeddings import publish_model_embeddings
from recsys.logs import configure_logging

log = logging.getLogger("plexrec.learn")

LOCK_FILE = "learn.lock"  # in the run directory: held by its one learner


class LearnerRunningError(RuntimeError):
    """Another process is learning into the same run directory."""


# run directory -> [the open lock file, how many StreamLearners of this process use it]: the lock
# keeps other processes out; learners of one process (tests) share it
_run_locks: dict[Path, list] = {}


def _hold_run_lock(run_dir: Path) -> None:
    key = run_dir.resolve()
    if key in _run_locks:
        _run_locks[key][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        _run_locks[key] = [hold_exclusive(key / LOCK_FILE), 1]
    except HeldByAnother as held:
        raise LearnerRunningError(
            f"another plexrec learn (pid {held.pid if held.pid is not None else 'unknown'}) is learning into "
            f"{run_dir} (it holds {held.lock_path}); one learner per run directory: stop it first") from None


def _release_run_lock(run_dir: Path) -> None:
    key = run_dir.resolve()
    held = _run_locks.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        held[0].close()
        del _run_locks[key]


@dataclass
class LearnConfig:
    model_dir: str  # the models root serving watches; the run directory is its parent
    data_dir: str | None = None
    profile: str = "local"
    redis_url: str | None = None
    export_seconds: float = 10.0  # an export (checkpoint, version, publish) takes about a second here
    export_events: int = 5000
    poll_seconds: float = 2.0
    keep_versions: int = 10  # the learner's own versions kept under the models root, newest first
    stop_after_idle_seconds: float | None = None  # None: run until stopped

    def check(self) -> None:
        if self.export_seconds <= 0 or self.export_events < 1 or self.poll_seconds <= 0 or self.keep_versions < 2:
            raise ValueError("--export-seconds and --poll-seconds must be > 0, --export-events >= 1, "
                             "--keep-versions >= 2 (a server may still be loading the one before the newest)")


@dataclass
class LearnStats:
    events: int = 0  # learned by this process
    windows: int = 0
    versions: list[str] = field(default_factory=list)
    published: int = 0


def learned_offsets(manifest: dict) -> dict[str, int]:
    """Per position, the last offset a version learned up to, from its manifest ({} for a version no
    learner exported)."""
    continual = (manifest.get("metrics") or {}).get("continual") or {}
    return {str(p): int(o) for p, o in ((continual.get("position") or {}).get("offsets") or {}).items()}


class StreamLearner:
    """One learner over one store: ``run()`` until stopped, or ``step()`` one window at a time;
    ``close()`` (or a ``with`` block) lets another process learn into the run directory."""

    def __init__(self, config: LearnConfig) -> None:
        config.check()
        self.config = config
        self.models = Path(config.model_dir)
        if (self.models / MANIFEST_FILE).exists():  # a version directory: its root is what serving watches
            self.models = self.models.parent
        self.run_dir = self.models.parent
        _hold_run_lock(self.run_dir)  # LearnerRunningError, naming the holder's pid
        self._locked = True
        try:
            self.directory = data_dir(config.data_dir)
            read_store_meta(self.directory)  # StoreError, saying what to do, where no store was loaded
            self.store = open_store(config.profile, self.directory, config.redis_url)
            self.learner: ContinualLearner | None = None
            self.version: Path | None = None  # the version the learner's state descends from
            self.offsets: dict[str, int] | None = None  # "<topic incarnation>/<partition>" -> last offset learned
            self.stats = LearnStats()
            self._unexported = 0
            self._export_due = False
            self._last_export = time.monotonic()
            self._own: set[str] = set()  # the versions this learner exported
            self._listed: set[str] = set()  # the versions in the models root at the last look
            # the store's published item vectors (read from its files at the first publish, then kept)
            self._published = PublishedEmbeddings()
            self._follow()
            if (self.run_dir / CONTINUAL_DIR / EXPORT_STAGING).exists():
                # a learner died exporting what it had learned: learned again from the stream, it is
                # served at the first window, not an export period later
                log.info("a previous learner died while exporting (%s is left): exporting the first window at once",
                         self.run_dir / CONTINUAL_DIR / EXPORT_STAGING)
                self._export_due = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the run directory's lock (another process may then learn into it)."""
        if self._locked:
            _release_run_lock(self.run_dir)
            self._locked = False

    def __enter__(self) -> StreamLearner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- which version the learner continues ---

    def _follow(self) -> bool:
        """Continue from the version serving picks when the learner's state no longer leads to it: at
        the start, the newest version; then a version that appeared and is not the learner's own (the
        newest such), or, when the version it descends from was removed, the newest one. True when it
        switched (what it learned since its last export is dropped: another lineage's)."""
        versions = version_directories(self.models)[0]
        if not versions:
            raise ModelArtifactError(f"{self.models}: holds no exported model version (YYYYMMDDTHHMMSSmmm-xxxxxxxx); "
                                     "run `plexrec train` first")
        names = {v.name for v in versions}
        appeared = [v for v in versions if v.name not in self._listed and v.name not in self._own]
        self._listed = names
        if self.version is None:
            target, why = versions[-1], "the newest version"
        elif appeared:
            target, why = appeared[-1], "a version this learner did not export (a retrain?)"
        elif self.version.name not in names:
            target, why = versions[-1], f"the newest version: {self.version.name} was removed (a rollback?)"
        else:
            return False
        self._continue_from(target, why, behind=target != versions[-1])
        return True

    def _continue_from(self, version: Path, why: str, behind: bool) -> None:
        manifest = read_manifest(version)
        checkpoint_of(version)  # ModelArtifactError now, saying why, where it cannot be continued
        metrics = manifest.get("metrics") or {}
        dropped, previous = self._unexported, self.version
        self.learner, self.version, self._unexported = None, version, 0  # built from it at the next window
        self._config = RunConfig.from_dict(manifest["config"])
        if "continual" in metrics:  # a learner's export: the offsets it learned up to
            self.offsets, self._data_until = learned_offsets(manifest), None
            position = f"its offsets {self.offsets}"
        else:  # a training run's: placed in the log at the first step, by its data's newest example
            self.offsets, self._data_until = None, metrics.get("data_until")
            position = f"its data up to {self._data_until}"
        # behind: a version named before this learner's newest export (a retrain that was still writing
        # when the learner last looked): serving has the learner's; a version of this lineage must follow
        self._export_due = behind
        if previous is None:
            log.info("continuing from %s, %s, as stream position %s", version.name, why, position)
        else:
            log.warning("continuing from %s, %s, instead of %s: as stream position %s; %d events learned since "
                        "the last export are dropped (another lineage's)%s", version.name, why, previous.name,
                        position, dropped, "; exporting at the next step (a newer name of this learner's is "
                        "served)" if behind else "")

    def _first_offsets(self) -> dict[str, int]:
        """Offsets past the events the base version's data may hold: per position, the offset of the
        last logged event at or before its ``data_until``; what follows it is new (a stream in time
        order puts every later event there; one that came late, behind it, is taken as learned)."""
        if self._data_until is None:
            log.warning("%s records no data_until (exported before it was recorded): every logged event counts "
                        "as new", self.version)
            return {}
        logged = read_event_log(self.directory)
        if not len(logged):
            return {}
        stamps = event_times(logged, stored_schema(self.directory))
        return last_offsets(logged[stamps <= int(self._data_until)])

    # --- one window ---

    def step(self) -> int:
        """Follow the served lineage, compact, learn the events past the offsets, export when due; how
        many events were learned."""
        self._follow()
        compaction = compact_event_log(self.directory)
        if self.offsets is None:  # the first start: once there is a log to place the base version's data in
            self.offsets = self._first_offsets()
        rows, reached = events_after(self.directory, self.offsets)
        if len(rows):
            examples = examples_from_store(self.store, self.directory, compact=False, events=rows)
            learner = self._learner(examples)
            started = time.perf_counter()
            learned = learner.learn(examples)
            self.stats.events += learned.examples
            self.stats.windows += 1
            self._unexported += learned.examples
            log.info("learned %d events (log loss before learning them %.4f) in %.1f s, up to event time %s; "
                     "%s", learned.examples, learned.loss, time.perf_counter() - started,
                     learner.progress.last_event_time, compaction.summary())
        self.offsets = reached
        if self._unexported and (self._export_due or self._unexported >= self.config.export_events
                                 or time.monotonic() - self._last_export >= self.config.export_seconds):
            self.export()
        return len(rows)

    def _learner(self, examples) -> ContinualLearner:
        """Built at the first window from the version followed (its examples give the feature and dense
        names): its weights, optimizer state and progress."""
        if self.learner is None:
            self.learner = ContinualLearner.from_model_dir(self.version, examples, out_dir=self.run_dir)
        return self.learner

    def export(self) -> Path | None:
        """Export a version carrying its checkpoint and the offsets, publish the items whose vectors
        changed. Nothing when a version of another lineage appeared meanwhile (the learner follows it)."""
        if self.learner is None or not self._unexported or self._follow():
            return None
        self.learner.progress.position = {"offsets": dict(sorted(self.offsets.items()))}
        version, base = self.learner.export(), self.version
        self._unexported, self._last_export, self._export_due = 0, time.monotonic(), False
        self.version = version
        self._own.add(version.name)
        self._listed.add(version.name)
        self.stats.versions.append(version.name)
        published = self._publish(version)
        self.stats.published += published
        self._prune_versions()
        log.info("exported %s, descending from %s (%d events learned in all, offsets %s); published %d changed "
                 "item embeddings", version.name, base.name, self.learner.progress.examples, self.offsets, published)
        return version

    def _prune_versions(self) -> None:
        """Only the newest ``keep_versions`` of the learner's versions stay (one every --export-seconds
        would fill the disk, and serving lists them all), and so do only their published item
        embeddings' files (features/publish.py: rows still some item's newest are carried over); a
        training run's exports are never removed."""
        versions, _ = version_directories(self.models)
        learned = [v for v in versions if "continual" in (read_manifest(v).get("metrics") or {})]
        removed = learned[:-self.config.keep_versions]
        if removed:  # the files first: a kill before the directories go prunes them again next time
            prune_item_embeddings(self.store, [v.name for v in removed], self.directory, state=self._published)
        for old in removed:
            shutil.rmtree(old, ignore_errors=True)

    def _publish(self, version: Path) -> int:
        """The catalogue's items whose vectors differ from the store's published ones, tagged with
        ``version``; how many were written."""
        return publish_model_embeddings(version, self.store, self.directory, state=self._published)[0]

    # --- the loop ---

    def run(self) -> LearnStats:
        stopping = []

        def stop(signum, frame):
            log.info("%s: exporting what was learned, then stopping", signal.Signals(signum).name)
            stopping.append(signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        idle_since = time.monotonic()
        try:
            while not stopping:
                if self.step():
                    idle_since = time.monotonic()
                elif (self.config.stop_after_idle_seconds is not None
                      and time.monotonic() - idle_since > self.config.stop_after_idle_seconds):
                    log.info("no new events for %.0f s: stopping", self.config.stop_after_idle_seconds)
                    break
                else:
                    time.sleep(self.config.poll_seconds)
            self.export()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.stats


def add_learn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True,
                        help="the models root `plexrec serve` watches (a training run's <out>/models); new "
                             "versions are exported there, each carrying the checkpoint it continues from")
    parser.add_argument("--data-dir", help="the feature store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    parser.add_argument("--profile", default="local", choices=["local", "redis"], help="store profile")
    parser.add_argument("--redis-url", help="host:port of Redis for --profile redis")
    parser.add_argument("--export-seconds", type=float, default=10.0,
                        help="export a new version at least this often while events arrive")
    parser.add_argument("--export-events", type=int, default=5000,
                        help="... or as soon as this many events were learned since the last version")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for new events")
    parser.add_argument("--stop-after-idle-seconds", type=float,
                        help="stop (after a last export) once no event arrived for this long")
    parser.add_argument("--keep-versions", type=int, default=10,
                        help="the learner's own newest versions kept under --model-dir (older ones are removed)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (measured on 2 cores beside the ingester: 1 learns 8-16x faster "
                             "than 2)")
    parser.add_argument("--verbose", action="store_true", help="also TorchRec's, fbgemm's and torch's log lines")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plexrec learn", description=__doc__.splitlines()[0])
    add_learn_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    torch.set_num_threads(args.torch_threads)
    config = LearnConfig(model_dir=args.model_dir, data_dir=args.data_dir, profile=args.profile,
                         redis_url=args.redis_url, export_seconds=args.export_seconds,
                         export_events=args.export_events, poll_seconds=args.poll_seconds,
                         keep_versions=args.keep_versions,
                         stop_after_idle_seconds=args.stop_after_idle_seconds)
    try:
        with StreamLearner(config) as learner:
            stats = learner.run()
    except (StoreError, ModelArtifactError, LearnerRunningError, ValueError) as exc:
        sys.exit(f"plexrec learn: {exc}")
    log.info("learned %d events in %d windows; exported %d versions%s", stats.events, stats.windows,
             len(stats.versions), f" (last {stats.versions[-1]})" if stats.versions else "")


if __name__ == "__main__":
    main()
