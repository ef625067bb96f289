"""The continual learner (recsys/continual.py): windows of new events learned in time order, resumed
with the optimizers' state, exported as versions that load and score like the learner."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.continual import ContinualLearner, checkpoint_of, in_time_order, latest_checkpoint, time_windows
from recsys.data.batching import make_batch
from features.examples import TEST, VALID
from recsys.config import RunConfig
from recsys.export import export_model, latest_model_dir, load_model, version_directories
from recsys.train import Trainer
from tests.conftest import small_config


@pytest.fixture(scope="module")
def base_run(small_examples, tmp_path_factory):
    """A briefly trained run's checkpoint (one epoch on the first 120 users): (config, checkpoint)."""
    config = small_config()
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path_factory.mktemp("run"))
    trainer.train_epoch(progress=False)
    return config, trainer.save_checkpoint()


@pytest.fixture
def windows(small_examples):
    """(A, B): two windows of later events, A before B per user (the last-n split's valid and test parts)."""
    return small_examples.split_part(VALID), small_examples.split_part(TEST)


def learner_from(base_run, small_examples, out_dir) -> ContinualLearner:
    config, checkpoint = base_run
    return ContinualLearner.from_checkpoint(config, checkpoint, small_examples, out_dir=out_dir)


def unified_table(learner: ContinualLearner) -> torch.Tensor:
    (shard,) = learner.trainer.model.state_dict()["embedding.ebc.embedding_bags.unified.weight"].local_shards()
    return shard.tensor.detach().clone()


def tower_parameters(learner: ContinualLearner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.trainer.dense_optimizer.params.items()}


def test_learning_a_window_moves_its_scores_toward_its_labels(base_run, small_examples, windows, tmp_path):
    window, _ = windows
    learner = learner_from(base_run, small_examples, tmp_path)
    before = learner.evaluate(window)
    tables, tower = unified_table(learner), tower_parameters(learner)
    learned = learner.learn(window)
    after = learner.evaluate(window)
    # both optimizers stepped: the fused Adagrad inside the backward, Adam after it
    assert (unified_table(learner) != tables).any(dim=1).sum() > 100
    assert all((tower_parameters(learner)[name] != value).any() for name, value in tower.items())
    assert (learned.examples, learned.steps) == (len(window), -(-len(window) // 128))
    assert np.isfinite(learned.loss) and learned.unknown_values == 0
    assert after["logloss"] < before["logloss"] - 0.005
    assert after["auc"] > before["auc"]
    progress = learner.progress
    assert (progress.examples, progress.steps, progress.last_event_time) == (
        len(window), learned.steps, int(window.timestamp.max()))


def test_learn_goes_through_the_events_in_time_order(base_run, small_examples, windows, tmp_path, monkeypatch):
    window, _ = windows
    assert not np.all(np.diff(window.timestamp) >= 0)  # built per user: not in time order as given
    learner = learner_from(base_run, small_examples, tmp_path)
    seen = []
    step = learner._step

    def recording(batch):
        seen.append((batch.user_ids.numpy().copy(), batch.labels.numpy().copy()))
        return step(batch)

    monkeypatch.setattr(learner, "_step", recording)
    learner.learn(window)
    order = np.argsort(window.timestamp, kind="stable")  # ties keep the order given
    assert [len(users) for users, _ in seen] == [len(part) for part in np.array_split(
        order, np.arange(128, len(order), 128))]
    np.testing.assert_array_equal(np.concatenate([users for users, _ in seen]), window.user_id[order])
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in seen]), window.label[order])
    assert in_time_order(window).timestamp.tolist() == sorted(window.timestamp.tolist())
    parts = time_windows(window, 3)
    assert [len(p) for p in parts] == [len(p) for p in np.array_split(order, 3)]
    assert parts[0].timestamp.max() <= parts[1].timestamp.min() <= parts[1].timestamp.max() <= parts[2].timestamp.min()


def test_a_resumed_learner_goes_on_as_one_that_never_stopped(base_run, small_examples, windows, tmp_path):
    """Learn A, checkpoint, a new learner from it learns B == one learner learning A then B: the
    fused row-wise Adagrad and the Adam state travel with the checkpoint."""
    a, b = windows
    config, _ = base_run
    straight = learner_from(base_run, small_examples, tmp_path / "straight")
    straight.learn(a)
    straight.learn(b)
    expected = straight.predict(b)

    first = learner_from(base_run, small_examples, tmp_path / "resumed")
    first.learn(a)
    checkpoint = first.save_checkpoint(position={"offset": len(a)})
    del first
    assert latest_checkpoint(tmp_path / "resumed") == checkpoint
    # built from the new window alone: the tables' sizes come from the checkpoint, not from these examples
    resumed = ContinualLearner.from_checkpoint(config, checkpoint, b)
    assert resumed.trainer.out_dir == (tmp_path / "resumed").resolve()  # the run's dir, from the checkpoint's path
    assert (resumed.progress.examples, resumed.progress.position) == (len(a), {"offset": len(a)})
    at_checkpoint = resumed.predict(b)
    resumed.learn(b)
    np.testing.assert_allclose(resumed.predict(b), expected, atol=1e-6)
    assert dataclasses.replace(resumed.progress, saves=0, position={}) == dataclasses.replace(
        straight.progress, saves=0, position={})

    # the same weights without the optimizers' state learn B into another model
    weights_only = Trainer(config, examples=small_examples, out_dir=tmp_path / "weights_only")
    weights_only.load_model_weights(checkpoint)
    cold = ContinualLearner(weights_only)
    np.testing.assert_allclose(cold.predict(b), at_checkpoint, atol=1e-6)
    cold.learn(b)
    assert np.abs(cold.predict(b) - expected).max() > 1e-3


def test_an_export_loads_and_scores_like_the_learner(base_run, small_examples, windows, tmp_path):
    a, b = windows
    learner = learner_from(base_run, small_examples, tmp_path)
    learner.learn(a)
    first = learner.export({"note": "after A"})
    learner.learn(b)
    second = learner.export()  # within the same second as the first, often: still a new version
    assert first != second and latest_model_dir(tmp_path / "models") == second

    model, manifest = load_model(second)
    batch = make_batch(b, np.arange(len(b)), learner.trainer.batch_features, learner.trainer.history_length)
    with torch.inference_mode():
        exported = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()
    np.testing.assert_allclose(exported, learner.predict(b), atol=1e-6)
    assert manifest["metrics"]["continual"]["examples"] == len(a) + len(b)
    assert load_model(first)[1]["metrics"]["note"] == "after A"

    # the version carries the checkpoint it came from: a learner for the served model starts there
    assert checkpoint_of(second) == second / "checkpoint" and learner.latest_checkpoint() is None
    again = ContinualLearner.from_model_dir(second, small_examples)
    np.testing.assert_allclose(again.predict(b), exported, atol=1e-6)
    assert again.progress.examples == len(a) + len(b)


def test_a_process_killed_while_saving_leaves_the_last_checkpoint(base_run, small_examples, windows, tmp_path,
                                                                   monkeypatch):
    a, b = windows
    config, _ = base_run
    learner = learner_from(base_run, small_examples, tmp_path)
    learner.learn(a)
    saved = learner.save_checkpoint()
    learner.learn(b)
    write_tensors = learner.trainer.save_checkpoint

    def killed_after_the_tensors(path):
        write_tensors(path)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(learner.trainer, "save_checkpoint", killed_after_the_tensors)
    with pytest.raises(KeyboardInterrupt):
        learner.save_checkpoint()
    assert latest_checkpoint(tmp_path) == saved
    resumed = ContinualLearner.from_checkpoint(config, latest_checkpoint(tmp_path), small_examples)
    assert resumed.progress.examples == len(a)
    assert resumed.save_checkpoint().name == "ckpt-00000002"  # over the dead save's leftover
    assert sorted(p.name for p in (tmp_path / "continual").iterdir()) == ["ckpt-00000001", "ckpt-00000002"]


def test_new_ids_are_learned_by_unified_tables_not_by_the_full_vocabulary(base_run, small_examples, windows,
                                                                          tmp_path):
    """Two movies first seen in the stream, one liked by everyone who saw it, one by nobody: unified
    embedding hashes each to its own rows and learns to tell them apart; the full-vocabulary baseline
    maps both to its shared unknown row 0 (and says how many values it did)."""
    a, _ = windows
    liked, disliked = 10**9 + 7, 10**9 + 11

    def shown(rows, movie: int, label: float = 0.0):
        window = a.subset(rows)
        values = dict(window.feature_values, item_id=np.full(len(window), movie, dtype=np.int64))
        return dataclasses.replace(window, feature_values=values, item_id=values["item_id"],
                                   label=np.full(len(window), label, dtype=np.float32))

    everyone = np.arange(len(a))
    half = a.user_id % 2 == 0
    stream = [shown(np.flatnonzero(half), liked, 1.0), shown(np.flatnonzero(~half), disliked, 0.0)]

    def preference(learner) -> float:  # how much more the learner expects a click on the liked movie
        return float(np.mean(learner.predict(shown(everyone, liked)) - learner.predict(shown(everyone, disliked))))

    unified = learner_from(base_run, small_examples, tmp_path / "unified")
    before = preference(unified)
    for _ in range(2):
        assert [unified.learn(window).unknown_values for window in stream] == [0, 0]
    assert preference(unified) > before + 0.1

    config = small_config()
    config.embedding.kind, config.data.dense = "full", ["log_item_prior_count"]  # and one dense column of two
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path / "full")
    trainer.train_epoch(progress=False)
    full = ContinualLearner.from_checkpoint(config, trainer.save_checkpoint(), a)
    # its vocabularies came back from the checkpoint; the windows' dense columns are the model's
    np.testing.assert_allclose(full.predict(a), trainer.predict(a.keep_dense(config.data.dense)), atol=1e-6)
    for _ in range(2):
        assert [full.learn(window).unknown_values for window in stream] == [len(w) for w in stream]
    assert preference(full) == 0.0  # one row for both


def exported_scores(version, examples, learner: ContinualLearner) -> np.ndarray:
    """What the version's exported weights score ``examples`` (serving's model)."""
    model, _ = load_model(version)
    batch = make_batch(examples, np.arange(len(examples)), learner.trainer.batch_features,
                       learner.trainer.history_length)
    with torch.inference_mode():
        return torch.sigmoid(model(batch.dense, batch.sparse)).numpy()


def test_every_version_can_be_continued_from_with_the_weights_it_serves(base_run, small_examples, windows,
                                                                         tmp_path):
    """Five learner versions (more than the checkpoints a learner keeps) and two training runs into one
    run directory (the second's checkpoints replace the first's): each version continues with the
    weights it serves and the progress it recorded."""
    a, b = windows
    learner = learner_from(base_run, small_examples, tmp_path)
    versions = []
    for window in time_windows(a, 5):
        learner.learn(window)
        versions.append(learner.export())
    for seed in (1, 2):
        config = small_config(seed=seed)
        versions.append(Path(Trainer(config, examples=small_examples, out_dir=tmp_path).fit(progress=False)
                             ["model_dir"]))
    for version in versions:
        again = ContinualLearner.from_model_dir(version, small_examples)
        np.testing.assert_allclose(again.predict(b), exported_scores(version, b, again), atol=1e-6)
        recorded = load_model(version)[1]["metrics"].get("continual", {}).get("examples", 0)
        assert again.progress.examples == recorded and again.base_version == version.name


def test_exports_of_one_model_within_a_second_take_their_own_names_in_order(base_run, small_examples, tmp_path):
    """Versions of one fingerprint written within one second (a retrain beside a learner, quick
    exports): each takes its own name, the names sort in the order written, each loads. (Names were
    per second: the second export's rename failed, Directory not empty.) A version rolled back and the
    export after it within that second: two names, or serving, which follows names, would keep the
    removed one's weights."""
    first = learner_from(base_run, small_examples, tmp_path).export()
    model, manifest = load_model(first)
    config = RunConfig.from_dict(manifest["config"])
    while datetime.now(timezone.utc).microsecond > 200_000:  # the start of a second: the exports share it
        time.sleep(0.01)
    versions = [export_model(model, config, manifest["vocab_sizes"], manifest["dense_features"], {}, first.parent)
                for _ in range(3)]
    assert len(set(versions)) == 3 and version_directories(first.parent)[0] == [first, *versions]
    for version in versions:
        assert load_model(version)[1]["model_version"] == version.name

    while datetime.now(timezone.utc).microsecond > 200_000:
        time.sleep(0.01)
    rolled_back = export_model(model, config, manifest["vocab_sizes"], manifest["dense_features"], {}, first.parent)
    shutil.rmtree(rolled_back)
    after = export_model(model, config, manifest["vocab_sizes"], manifest["dense_features"], {}, first.parent)
    assert after.name != rolled_back.name and after.name > versions[-1].name


def test_an_export_is_on_disk_before_its_name_is(base_run, small_examples, windows, tmp_path, monkeypatch):
    """Every file of a version (weights, manifest, checkpoint) and every folder of it is fsynced before
    the rename that gives the version its name, and the models folder after it: a crash never leaves a
    named version with missing data. What this checks is the order of the calls, not a power loss."""
    a, _ = windows
    learner = learner_from(base_run, small_examples, tmp_path)
    learner.learn(a)
    calls: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        calls.append(("replace", (str(source), str(target))))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    version = learner.export()
    monkeypatch.undo()
    staging = str(version.parent / f".{version.name}.tmp")
    (named,) = [i for i, (kind, what) in enumerate(calls) if kind == "replace" and what == (staging, str(version))]
    synced_before = {what for kind, what in calls[:named] if kind == "fsync"}
    contents = [staging + str(path)[len(str(version)):] for path in [version, *version.rglob("*")]]
    assert not set(contents) - synced_before, sorted(set(contents) - synced_before)
    assert any(path.endswith("/checkpoint/plexrec_checkpoint.json") for path in contents)
    assert ("fsync", str(version.parent)) in calls[named + 1:]
