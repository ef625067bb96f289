"""`plexrec learn` against the real embedded broker, the real ingester and a real local Feast store:
a model trained on the store's past follows the events streamed after it, exports new versions with
the offsets they learned up to, publishes their item embeddings, and after SIGKILL resumes so that
the surviving model learned every event exactly once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from features.event_log import events_after, last_offsets, read_event_log
from features.events import schema_events
from features.online import OnlineFeatures
from features.store import open_store
from features.training import examples_from_store
from recsys.continual import ContinualLearner, checkpoint_of
from recsys.export import WEIGHTS_FILE, latest_model_dir, read_manifest, version_directories
from recsys.learn import LearnConfig, StreamLearner
from recsys.checkpoints import CHECKPOINT_META
from recsys.train import Trainer

from .conftest import small_config
from .test_event_log import loaded, split_by_time, stream

HISTORY = 50


@pytest.fixture
def trained_on_the_past(ml100k_tables, tmp_path):
    """A store of the first 70% of 60 MovieLens users' ratings, a DARE model trained on it (from the
    store), and the remaining 30%: (store, store directory, models root, future rows)."""
    schema = ml100k_tables.schema
    ratings = ml100k_tables.interactions
    past, future = split_by_time(ratings[ratings[schema.user] <= 60], schema, 0.7)
    store_dir = tmp_path / "store"
    store = loaded(ml100k_tables, past, store_dir, HISTORY)
    train_from_store(store, store_dir, tmp_path / "run")
    return store, store_dir, tmp_path / "run" / "models", future


def train_from_store(store, store_dir, run_dir) -> Path:
    """`plexrec train` of a DARE model on what the store holds (streamed events included) into
    ``run_dir``; its exported version."""
    config = small_config(epochs=1)
    config.sequence.mode, config.sequence.top_k, config.data.max_history = "dare", 8, HISTORY
    return Path(Trainer(config, examples=examples_from_store(store, store_dir), out_dir=run_dir)
                .fit(progress=False)["model_dir"])


def continual_of(version) -> dict:
    return read_manifest(version)["metrics"]["continual"]


def weight_distance(a, b) -> float:
    """The summed absolute difference of two versions' exported weights."""
    left, right = load_file(str(Path(a) / WEIGHTS_FILE)), load_file(str(Path(b) / WEIGHTS_FILE))
    return float(sum((left[name] - right[name]).abs().sum() for name in left))


def learned_so_far(run_dir):
    """(examples learned, offsets) of the checkpoint of the newest version (what a learner continues)."""
    checkpoint = checkpoint_of(latest_model_dir(run_dir / "models"))
    progress = json.loads((checkpoint / CHECKPOINT_META).read_text())["continual"]["progress"]
    return progress["examples"], progress["position"]["offsets"]


def log_offsets(directory) -> dict[str, int]:
    return last_offsets(read_event_log(directory))


def test_the_learner_learns_each_streamed_event_once_exports_and_publishes(broker, trained_on_the_past,
                                                                           ml100k_tables):
    store, store_dir, models, future = trained_on_the_past
    base = version_directories(models)[0][-1]
    stream(broker, store, store_dir, schema_events(future, ml100k_tables.schema), max_batch=200)
    learner = StreamLearner(LearnConfig(model_dir=str(models), data_dir=str(store_dir), export_events=10**9,
                                        export_seconds=10**9))
    assert learner.step() == len(future)  # every streamed rating, none of the loaded past
    assert learner.step() == 0  # nothing new: nothing learned again
    version = learner.export()
    assert version is not None and version != base and version_directories(models)[0][-1] == version
    examples, offsets = learned_so_far(models.parent)
    assert examples == len(future) and offsets == log_offsets(store_dir)
    assert read_manifest(version)["metrics"]["continual"]["position"]["offsets"] == offsets

    # the new version learned the stream: its log loss on the streamed events is below the base's
    rows, _ = events_after(store_dir, {})
    window = examples_from_store(store, store_dir, compact=False, events=rows)
    before = ContinualLearner.from_model_dir(base, window).evaluate(window)["logloss"]
    after = learner.learner.evaluate(window)["logloss"]
    assert after < before - 0.005, (before, after)

    # its item embeddings are published, tagged with the new version; serving's read sees that version
    online = OnlineFeatures(store)
    items = online.items([int(i) for i in future["item_id"].unique()[:20]])
    assert {item.model_version for item in items.values()} == {read_manifest(version)["model_version"]}

    # only the learner's newest versions stay; the training run's export is never removed
    learner.config.keep_versions = 2
    for _ in range(2):
        learner._unexported = 1  # as if an event had been learned since
        newest = learner.export()
    remaining = version_directories(models)[0]
    assert remaining[0] == base and len(remaining) == 3 and remaining[-1] == newest and version not in remaining

    # a second learner resumes from the checkpoint: the same events are not learned again
    again = StreamLearner(LearnConfig(model_dir=str(models), data_dir=str(store_dir)))
    assert again.step() == 0 and again.export() is None


def wait_for_line(path, text: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert process.poll() is None, path.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path} after {timeout} s:\n{path.read_text()[-3000:]}")


def test_after_sigkill_the_learner_resumes_and_learns_no_event_twice(broker, trained_on_the_past, ml100k_tables,
                                                                      tmp_path):
    """Three waves of events (40%, 20%, 40%); the learner exports once 40% are learned. It learns the
    first wave and exports; it learns the second (not yet due for export: no checkpoint) and is killed
    with SIGKILL; the restarted one resumes from the first wave's checkpoint. At the end the surviving
    model learned every streamed event exactly once (a learner that saved its offsets apart from its
    weights would have lost the second wave; one that ignored them would have learned the first twice)."""
    store, store_dir, models, future = trained_on_the_past
    events = schema_events(future, ml100k_tables.schema)
    cuts = [int(len(events) * 0.4), int(len(events) * 0.6)]
    waves = [events[:cuts[0]], events[cuts[0]:cuts[1]], events[cuts[1]:]]
    command = [sys.executable, "-m", "plexrec.cli", "learn", "--model-dir", str(models), "--data-dir",
               str(store_dir), "--export-events", str(len(waves[0])), "--export-seconds", "100000",
               "--poll-seconds", "0.2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    stream(broker, store, store_dir, waves[0])
    first_log = tmp_path / "learn-1.log"
    first = subprocess.Popen(command, stderr=first_log.open("w"), env=env)
    try:
        wait_for_line(first_log, "exported", first)
        assert learned_so_far(models.parent)[0] == len(waves[0])
        first.send_signal(signal.SIGSTOP)  # the whole second wave logged before the learner looks again
        stream(broker, store, store_dir, waves[1])
        first.send_signal(signal.SIGCONT)
        wait_for_line(first_log, f"learned {len(waves[1])} events", first)
        first.send_signal(signal.SIGKILL)  # learned, not checkpointed
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first_log.read_text().count("exported") == 1
    assert learned_so_far(models.parent)[0] == len(waves[0])  # the second wave's learning died with the process

    stream(broker, store, store_dir, waves[2])
    second_log = tmp_path / "learn-2.log"
    second = subprocess.run([*command, "--stop-after-idle-seconds", "2"], stderr=second_log.open("w"),
                            env=env, timeout=300)
    assert second.returncode == 0, second_log.read_text()[-3000:]
    assert "continuing from" in second_log.read_text()
    examples, offsets = learned_so_far(models.parent)
    assert examples == len(events) and offsets == log_offsets(store_dir)


def waves_by_time(future, schema, count: int):
    """The future's events in ``count`` waves of about equal size, no instant in two of them (so a
    retrain's newest example marks where its data ends in the log)."""
    waves = []
    for i in range(count - 1, 0, -1):
        future, later = split_by_time(future, schema, i / (i + 1))
        waves.insert(0, later)
    return [schema_events(wave, schema) for wave in [future, *waves]]


def test_a_retrain_exported_while_the_learner_runs_is_what_it_continues_from(broker, trained_on_the_past,
                                                                             ml100k_tables):
    """The learner exports its lineage; `plexrec train` into the same run exports a retrain on
    everything ingested; the running learner's next version descends from the retrain (its manifest
    names it, it learned only the events after the retrain's data, its weights are the retrain's
    moved a little), and it is the one served."""
    store, store_dir, models, future = trained_on_the_past
    first, second = waves_by_time(future, ml100k_tables.schema, 2)
    stream(broker, store, store_dir, first, max_batch=200)
    learner = StreamLearner(LearnConfig(model_dir=str(models), data_dir=str(store_dir), export_events=10**9,
                                        export_seconds=10**9))
    assert learner.step() == len(first)
    old_lineage = learner.export()

    retrain = train_from_store(store, store_dir, models.parent)  # while the learner runs
    assert version_directories(models)[0][-1] == retrain

    stream(broker, store, store_dir, second, max_batch=200)
    assert learner.step() == len(second)  # the retrain's data holds the first wave
    continued = learner.export()
    assert version_directories(models)[0][-1] == continued
    assert continual_of(continued)["base_version"] == retrain.name
    assert continual_of(continued)["examples"] == len(second)
    assert weight_distance(continued, retrain) < weight_distance(continued, old_lineage) / 2


def test_a_rollback_holds_for_the_running_learner_and_a_restarted_one(broker, trained_on_the_past, ml100k_tables):
    """An operator rolls back by deleting the newest learner version: the running learner continues
    from the version now newest (its offsets: the removed version's events are learned again onto it)
    and never exports the removed lineage; rolled back again, a restarted learner does the same."""
    store, store_dir, models, future = trained_on_the_past
    waves = waves_by_time(future, ml100k_tables.schema, 3)
    config = LearnConfig(model_dir=str(models), data_dir=str(store_dir), export_events=10**9, export_seconds=10**9)
    learner = StreamLearner(config)
    versions = []
    for wave in waves[:2]:
        stream(broker, store, store_dir, wave, max_batch=200)
        assert learner.step() == len(wave)
        versions.append(learner.export())
    kept, removed = versions

    shutil.rmtree(removed)  # the rollback
    stream(broker, store, store_dir, waves[2], max_batch=200)
    assert learner.step() == len(waves[1]) + len(waves[2])  # from the kept version's offsets
    after = learner.export()
    assert continual_of(after)["base_version"] == kept.name
    assert continual_of(after)["examples"] == sum(len(w) for w in waves)
    assert continual_of(after)["position"]["offsets"] == log_offsets(store_dir)

    shutil.rmtree(after)  # rolled back again; the learner stops (as a process would: its state gone)
    del learner
    restarted = StreamLearner(config)
    assert restarted.step() == len(waves[1]) + len(waves[2])
    again = restarted.export()
    assert continual_of(again)["base_version"] == kept.name
    assert continual_of(again)["examples"] == sum(len(w) for w in waves)
    names = [v.name for v in version_directories(models)[0]]
    assert removed.name not in names and after.name not in names and names[-2:] == [kept.name, again.name]


def test_a_second_learner_on_the_same_run_exits_naming_the_first(trained_on_the_past):
    store, store_dir, models, _ = trained_on_the_past
    config = LearnConfig(model_dir=str(models), data_dir=str(store_dir))
    command = [sys.executable, "-m", "plexrec.cli", "learn", "--model-dir", str(models), "--data-dir",
               str(store_dir), "--poll-seconds", "0.2", "--stop-after-idle-seconds", "1"]
    first = StreamLearner(config)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0, second.stderr[-3000:]
    assert f"another plexrec learn (pid {os.getpid()})" in second.stderr, second.stderr[-3000:]
    first.close()  # the first one gone, a learner starts
    after = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-3000:]


def test_a_learner_killed_while_exporting_exports_what_it_learned_at_once_on_restart(
        broker, trained_on_the_past, ml100k_tables, monkeypatch):
    """Killed after learning the stream and writing its checkpoint, before the version is in place:
    the restarted learner exports every learned event at its first window, on a quiet stream and
    however long its export period."""
    import recsys.train

    store, store_dir, models, future = trained_on_the_past
    events = schema_events(future, ml100k_tables.schema)
    stream(broker, store, store_dir, events, max_batch=200)
    config = LearnConfig(model_dir=str(models), data_dir=str(store_dir), export_events=10**9, export_seconds=10**9)
    learner = StreamLearner(config)
    assert learner.step() == len(events)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the checkpoint and the version")

    monkeypatch.setattr(recsys.train, "export_model", killed)
    with pytest.raises(KeyboardInterrupt):
        learner.export()
    monkeypatch.undo()
    del learner  # dead: what it learned is gone with it
    assert "continual" not in read_manifest(latest_model_dir(models))["metrics"]  # nothing served yet

    restarted = StreamLearner(config)
    restarted.step()
    assert len(restarted.stats.versions) == 1
    served = latest_model_dir(models)
    assert served.name == restarted.stats.versions[0]
    assert continual_of(served)["examples"] == len(events)
    assert continual_of(served)["position"]["offsets"] == log_offsets(store_dir)
