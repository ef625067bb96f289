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
  3. learn them, oldest first (recsys/continual.py: the served version's checkpoint, its
     optimizer state included)
  4. every ``--export-seconds`` or ``--export-events`` learned: a checkpoint (weights,
     optimizer state and the offsets learned up to, in one directory written whole) and
     a new version under ``--model-dir``, which ``plexrec serve`` picks up by itself; then
     the items whose embeddings changed are published tagged with that version (serving
     uses them, features/online.py)

Crash-safe: the offsets live in the checkpoint with the weights that learned up to them.
After a kill the job resumes from its latest checkpoint and takes the events after its
offsets: what it learned after that checkpoint died with the process, so every event is
learned once by the model that survives (tests/test_learn.py kills it with SIGKILL).

The first start (no learner checkpoint yet) takes the newest served version; events up to
the newest example of its training data (``data_until`` in its manifest) count as learned,
the rest of the log is new. On SIGINT / SIGTERM it finishes the window, exports what it
learned since the last version, and stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from features.event_log import (
    compact_event_log,
    event_times,
    events_after,
    last_offsets,
    read_event_log,
)
from features.publish import PublishedEmbeddings
from features.store import data_dir, open_store, read_store_meta, stored_schema
from recsys.config import RunConfig
from recsys.continual import ContinualLearner, latest_checkpoint
from recsys.export import (
    MANIFEST_FILE,
    latest_model_dir,
    read_manifest,
    version_directories,
)
from recsys.train import CHECKPOINT_META

log = logging.getLogger("plexrec.learn")


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
    """One learner over one store: ``run()`` until stopped, or ``step()`` one window at a time."""

    def __init__(self, config: LearnConfig) -> None:
        config.check()
        self.config = config
        self.models = Path(config.model_dir)
        if (self.models / MANIFEST_FILE).exists():  # a version directory: its root is what serving watches
            self.models = self.models.parent
        self.run_dir = self.models.parent
        self.directory = data_dir(config.data_dir)
        read_store_meta(self.directory)  # StoreError, saying what to do, where no store was loaded
        self.store = open_store(config.profile, self.directory, config.redis_url)
        self.learner: ContinualLearner | None = None
        self.offsets: dict[str, int] | None = None  # "<topic incarnation>/<partition>" -> last offset learned
        self.stats = LearnStats()
        self._unexported = 0
        self._last_export = time.monotonic()
        # the store's published item vectors (read from its files at the first publish, then kept)
        self._published = PublishedEmbeddings()
        self._resume()

    def _resume(self) -> None:
        """The learner's latest checkpoint and its offsets; else the served version's, offsets of its data."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            self._checkpoint = checkpoint
            # its config: the newest version's (a learner never changes it)
            self._config = RunConfig.from_dict(read_manifest(latest_model_dir(self.models))["config"])
            meta = json.loads((checkpoint / CHECKPOINT_META).read_text())
            position = meta["continual"]["progress"]["position"]
            self.offsets = {str(p): int(o) for p, o in position.get("offsets", {}).items()}
            log.info("resuming from %s: offsets %s", checkpoint, self.offsets)
            return
        self._checkpoint = None
        self._base = latest_model_dir(self.models)
        manifest = read_manifest(self._base)
        self._config = RunConfig.from_dict(manifest["config"])
        self._data_until = (manifest.get("metrics") or {}).get("data_until")
        log.info("starting from the served version %s (its data up to %s)", self._base.name, self._data_until)

    def _first_offsets(self) -> dict[str, int]:
        """Offsets past the events the base version's data may hold: per position, the offset of the
        last logged event at or before its ``data_until``; what follows it is new (a stream in time
        order puts every later event there; one that came late, behind it, is taken as learned)."""
        if self._data_until is None:
            log.warning("%s records no data_until (exported before it was recorded): every logged event counts "
                        "as new", self._base)
            return {}
        logged = read_event_log(self.directory)
        if not len(logged):
            return {}
        stamps = event_times(logged, stored_schema(self.directory))
        return last_offsets(logged[stamps <= int(self._data_until)])

    # --- one window ---

    def step(self) -> int:
        """Compact, learn the events past the offsets, export when due; how many events were learned."""
        compaction = compact_event_log(self.directory)
        if self.offsets is None:  # the first start: once there is a log to place the base version's data in
            self.offsets = self._first_offsets()
        rows, reached = events_after(self.directory, self.offsets)
        if len(rows):
            from features.training import examples_from_store

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
        if self._unexported and (self._unexported >= self.config.export_events
                                 or time.monotonic() - self._last_export >= self.config.export_seconds):
            self.export()
        return len(rows)

    def _learner(self, examples) -> ContinualLearner:
        """Built at the first window (its examples give the feature and dense names)."""
        if self.learner is None:
            if self._checkpoint is not None:
                self.learner = ContinualLearner.from_checkpoint(self._config, self._checkpoint, examples,
                                                                out_dir=self.run_dir)
            else:
                self.learner = ContinualLearner.from_model_dir(self._base, examples)
        return self.learner

    def export(self) -> Path | None:
        """Checkpoint with the offsets, export a version, publish the items whose vectors changed."""
        if self.learner is None or not self._unexported:
            return None
        self.learner.progress.position = {"offsets": dict(sorted(self.offsets.items()))}
        version = self.learner.export()
        self._unexported, self._last_export = 0, time.monotonic()
        self.stats.versions.append(version.name)
        published = self._publish(version)
        self.stats.published += published
        self._prune_versions()
        log.info("exported %s (%d events learned in all, offsets %s); published %d changed item embeddings",
                 version.name, self.learner.progress.examples, self.offsets, published)
        return version

    def _prune_versions(self) -> None:
        """Only the newest ``keep_versions`` of the learner's versions stay (one every --export-seconds
        would fill the disk, and serving lists them all), and so do only their published item
        embeddings' files (features/publish.py: rows still some item's newest are carried over); a
        training run's exports are never removed."""
        import shutil

        from features.publish import prune_item_embeddings

        versions, _ = version_directories(self.models)
        learned = [v for v in versions if "continual" in (read_manifest(v).get("metrics") or {})]
        removed = learned[:-self.config.keep_versions]
        if removed:  # the files first: a kill before the directories go prunes them again next time
            prune_item_embeddings(self.store, [v.name for v in removed], self.directory, state=self._published)
        for old in removed:
            shutil.rmtree(old, ignore_errors=True)

    def _publish(self, version: Path) -> int:
        """The catalogue's items whose vectors differ from the store's published ones, tagged with
        ``version`` (features/publish.py compares; with shared (hashed) rows any item may change, so all
        are compared); how many were written."""
        from features.publish import publish_item_embeddings
        from recsys.export import load_model
        from recsys.item_embeddings import catalogue_embeddings

        model, manifest = load_model(version)
        ids, representation, attention = catalogue_embeddings(model, self.directory)
        return publish_item_embeddings(self.store, ids, representation, attention, manifest["model_version"],
                                       self.directory, state=self._published)

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
                             "versions are exported there, learner checkpoints next to it in <out>/continual")
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
    from features.store import StoreError
    from recsys.cli import configure_logging
    from recsys.export import ModelArtifactError

    parser = argparse.ArgumentParser(prog="plexrec learn", description=__doc__.splitlines()[0])
    add_learn_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    import torch

    torch.set_num_threads(args.torch_threads)
    config = LearnConfig(model_dir=args.model_dir, data_dir=args.data_dir, profile=args.profile,
                         redis_url=args.redis_url, export_seconds=args.export_seconds,
                         export_events=args.export_events, poll_seconds=args.poll_seconds,
                         keep_versions=args.keep_versions,
                         stop_after_idle_seconds=args.stop_after_idle_seconds)
    try:
        stats = StreamLearner(config).run()
    except (StoreError, ModelArtifactError, ValueError) as exc:
        sys.exit(f"plexrec learn: {exc}")
    log.info("learned %d events in %d windows; exported %d versions%s", stats.events, stats.windows,
             len(stats.versions), f" (last {stats.versions[-1]})" if stats.versions else "")


if __name__ == "__main__":
    main()
