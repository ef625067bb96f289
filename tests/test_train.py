import json

import numpy as np
import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from features.errors import ConfigError
from recsys.config import FeatureConfig, load_config
from recsys.data.batching import make_batch
from recsys.embeddings import UnifiedEmbedding
from recsys.export import ModelArtifactError, load_model, read_manifest
from recsys.checkpoints import CheckpointMismatchError
from recsys.train import Trainer
from tests.conftest import small_config


def unified_weight(trainer: Trainer) -> torch.Tensor:
    value = trainer.model.state_dict()["embedding.ebc.embedding_bags.unified.weight"]
    if isinstance(value, ShardedTensor):
        (shard,) = value.local_shards()
        return shard.tensor.detach().clone()
    return value.detach().clone()


def test_a_step_changes_exactly_the_rows_it_read(small_examples, tmp_path):
    config = small_config()
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path)
    batch = make_batch(trainer.train_examples, np.arange(32), trainer.feature_names)
    rows_read = UnifiedEmbedding(config.features, config.embedding.num_rows, config.embedding.dim,
                                 device="meta").lookup_kjt(batch.sparse).values().unique()
    before = unified_weight(trainer)
    trainer.train_step(batch)
    changed = (unified_weight(trainer) != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == rows_read.tolist()
    assert 0 < len(changed) < config.embedding.num_rows


def test_resume_gives_the_same_next_step_loss(small_examples, tmp_path):
    config = small_config(epochs=2)
    straight = Trainer(config, examples=small_examples, out_dir=tmp_path / "a")
    batches = straight.batches()
    for _ in range(5):
        straight.train_step(next(batches))
    checkpoint = straight.save_checkpoint()
    expected = [straight.train_step(next(batches)) for _ in range(2)]

    fresh = Trainer(config, examples=small_examples, out_dir=tmp_path / "b")
    fresh_batches = fresh.batches()
    for _ in range(5):
        next(fresh_batches)
    # on the same sixth batch a model that did not load the checkpoint gives another loss
    assert fresh.train_step(next(fresh_batches)) != pytest.approx(expected[0], abs=1e-6)
    resumed = Trainer(config, examples=small_examples, out_dir=tmp_path / "b")
    resumed.load_checkpoint(checkpoint)
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (0, 5, 5)
    batches = resumed.batches()
    got = [resumed.train_step(next(batches)) for _ in range(2)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_checkpoint_of_another_model_is_refused(small_examples, tmp_path):
    trainer = Trainer(small_config(), examples=small_examples, out_dir=tmp_path)
    checkpoint = trainer.save_checkpoint()
    other = small_config()
    other.embedding.num_rows = 3000
    with pytest.raises(CheckpointMismatchError, match="written by another model"):
        Trainer(other, examples=small_examples, out_dir=tmp_path).load_checkpoint(checkpoint)


@pytest.mark.parametrize("sequence_mode", ["none", "mean", "coupled", "dare"])
def test_fit_exports_a_model_that_predicts_like_the_trainer(small_examples, tmp_path, sequence_mode):
    config = small_config(epochs=2, checkpoint_every_epoch=True)
    config.sequence.mode, config.sequence.top_k, config.data.max_history = sequence_mode, 8, 50
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path)
    result = trainer.fit(progress=False)
    assert result["test"]["auc"] > 0.6  # real signal on real data, not chance
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines[:-1]] == [1, 2] and lines[-1]["final"]
    assert (tmp_path / "training.png").stat().st_size > 10_000

    model, manifest = load_model(result["model_dir"])
    assert manifest["hash"] == {"name": "splitmix64-salted", "version": 1}
    assert manifest["metrics"]["test"]["auc"] == result["test"]["auc"]
    assert manifest["features"][0] == {"name": "user_id", "probes": 2}
    test = trainer.eval_examples["test"]
    batch = make_batch(test, np.arange(len(test)), trainer.batch_features, trainer.history_length)
    with torch.inference_mode():
        exported = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()
    np.testing.assert_allclose(exported, trainer.predict(test), atol=1e-6)
    # nothing pickled for serving: models/ holds this one version, with the manifest and the safetensors
    # weights (all load_model reads) and checkpoint/, the training state only a learner reads
    models, version = tmp_path / "models", manifest["model_version"]
    assert [p.name for p in models.iterdir()] == [version]
    assert sorted(p.name for p in (models / version).iterdir()) == ["checkpoint", "manifest.json",
                                                                     "weights.safetensors"]


def test_the_latest_model_dir_is_the_newest_version_never_another_directory(tmp_path):
    """`features publish --model-dir models/` picks a version, not `backup/` (which sorts after them)."""
    from recsys.export import latest_model_dir

    for name in ("20260101T000000-0000000a", "20260102T000000-0000000b", "backup", ".20260103T000000-c.tmp"):
        (tmp_path / name).mkdir()
    assert latest_model_dir(tmp_path).name == "20260102T000000-0000000b"
    with pytest.raises(ModelArtifactError, match="holds no exported model version"):
        latest_model_dir(tmp_path / "backup")


def test_damaged_or_foreign_model_dirs_are_refused(small_examples, tmp_path):
    with pytest.raises(ModelArtifactError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "plexrec-model", "format_version": 1,
                                                        "hash": {"name": "murmur", "version": 3}}))
    with pytest.raises(ModelArtifactError, match="embedding rows would be wrong"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("features,message", [
    ([{"name": "favourite_colour"}], "features.favourite_colour: not a feature of the data set"),
    ([{"name": "user_id", "probes": 0}], "needs at least 1 probe"),
])
def test_bad_feature_configs_say_what_to_fix(small_examples, tmp_path, features, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"features": features}))
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(path), examples=small_examples, out_dir=tmp_path)


def test_unknown_config_keys_and_kinds_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['epoch'\]"):
        load_config(None, {"train.epoch": 3})
    with pytest.raises(ConfigError, match="embedding.kind = 'lsh'"):
        load_config(None, {"embedding.kind": "lsh"})
    assert load_config("configs/ml100k.yaml").features[0] == FeatureConfig("user_id", 2)


def test_cli_stops_with_the_reason_not_a_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text("features:\n  - {name: user_id, probes: 0}\n")
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "plexrec train: features.user_id.probes = 0: a feature needs at least 1 probe" in done.stderr
    assert "Traceback" not in done.stderr


# --- the best epoch is the model: selection, early stopping, checkpoints ---

def _overfitting_config(epochs: int = 4, **train):
    """Learning rates high enough that later epochs overfit the small slice: the last epoch is not the best."""
    return small_config(epochs=epochs, embedding_lr=1.0, dense_lr=0.02, **train)


def test_the_exported_model_is_the_best_validation_epoch(small_examples, tmp_path):
    from recsys.metrics import ranking_metrics

    trainer = Trainer(_overfitting_config(), examples=small_examples, out_dir=tmp_path)
    result = trainer.fit(progress=False)
    aucs = [record["valid_auc"] for record in trainer.epoch_log]
    best = int(np.argmax(aucs)) + 1
    assert best != len(aucs), "the config no longer overfits: the test would not tell best from last"
    assert result["best_epoch"] == best and result["valid"]["epoch"] == best

    model, _ = load_model(result["model_dir"])
    valid = trainer.eval_examples["valid"]
    batch = make_batch(valid, np.arange(len(valid)), trainer.batch_features, trainer.history_length)
    with torch.no_grad():
        exported = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()
    assert ranking_metrics(valid.user_id, valid.label, exported)["auc"] == pytest.approx(aucs[best - 1], abs=1e-6)

    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["best_epoch"] == best and final["valid_auc"] == pytest.approx(aucs[best - 1])
    assert final["test_auc"] == pytest.approx(result["test"]["auc"])
    # checkpoints: the best (to export) and the latest (to resume), nothing else
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == sorted({trainer.epoch_log[best - 1]["checkpoint"], trainer.latest_checkpoint().name})


def test_early_stopping_ends_after_patience_epochs_without_a_better_one(small_examples, tmp_path):
    trainer = Trainer(_overfitting_config(epochs=8, early_stopping_patience=1), examples=small_examples,
                      out_dir=tmp_path)
    result = trainer.fit(progress=False)
    aucs = [record["valid_auc"] for record in trainer.epoch_log]
    best = int(np.argmax(aucs)) + 1
    assert result["stopped_early"] and result["epochs"] == best + 1 < 8
    assert result["best_epoch"] == best


def test_early_stopping_metric_can_be_log_loss(small_examples, tmp_path):
    config = _overfitting_config()
    config.train.early_stopping_metric = "logloss"
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path)
    result = trainer.fit(progress=False)
    losses = [record["valid_logloss"] for record in trainer.epoch_log]
    assert result["best_epoch"] == int(np.argmin(losses)) + 1
    with pytest.raises(ConfigError, match="train.early_stopping_metric = 'recall'"):
        load_config(None, {"train.early_stopping_metric": "recall"})


def test_set_reaches_feature_probes_and_names_what_it_cannot_apply():
    config = load_config("configs/ml100k.yaml", {"features.user_id.probes": 3})
    assert [(f.name, f.probes) for f in config.features][:3] == [("user_id", 3), ("item_id", 2), ("age_bucket", 1)]
    assert len(config.features) == 8  # the others are untouched
    with pytest.raises(ConfigError, match="features.user_id: set a feature's probes with features.<name>.probes"):
        load_config(None, {"features.user_id": 2})  # once silently replaced all eight features
    with pytest.raises(ConfigError, match=r"features.colour.probes: no feature 'colour' in the features list"):
        load_config(None, {"features.colour.probes": 2})
    with pytest.raises(ConfigError, match="data.max_history = 'long': expected int"):
        load_config(None, {"data.max_history": "long"})
    with pytest.raises(ConfigError, match="train.epochs is not a mapping"):
        load_config(None, {"train.epochs.first": 1})
    assert load_config(None, {"data.synthetic.num_users": 50}).data.synthetic == {"num_users": 50}
    assert [f.name for f in load_config(None, {"features": ["user_id", "item_id"]}).features] == ["user_id", "item_id"]


def test_dense_features_can_be_switched_off(small_examples, tmp_path):
    config = small_config()
    config.data.dense = []
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path)
    assert trainer.dense_names == [] and trainer.train_examples.dense.shape == (len(trainer.train_examples), 0)
    result = trainer.fit(progress=False)
    model, manifest = load_model(result["model_dir"])
    assert manifest["dense_features"] == [] and result["test"]["auc"] > 0.5
    config.data.dense = ["log_item_prior_count"]
    assert Trainer(config, examples=small_examples, out_dir=tmp_path / "one").dense_names == ["log_item_prior_count"]
    config.data.dense = ["price"]
    from features.schema import DataError

    with pytest.raises(DataError, match="data.dense: 'price' is not a dense feature"):
        Trainer(config, examples=small_examples, out_dir=tmp_path / "two")


def test_known_library_warnings_are_silenced_at_the_call_and_others_still_show(small_examples, tmp_path, caplog):
    import logging
    import warnings

    from recsys.known_warnings import torchrec_calls

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = small_config()
        config.sequence.mode, config.data.max_history = "dare", 20
        Trainer(config, examples=small_examples, out_dir=tmp_path).fit(progress=False)
    torchrec_records = [r for r in caplog.records if r.name.startswith(("torchrec", "torch."))]
    assert torchrec_records == [], [r.getMessage()[:80] for r in torchrec_records]
    assert not [w for w in caught if "DTensor" in str(w.message) or "broadcast_buffers" in str(w.message)]

    caplog.clear()
    with torchrec_calls(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging.getLogger("torchrec.distributed.planner.types").warning("a table does not fit in memory")
        warnings.warn("something new", FutureWarning)
    assert [r.getMessage() for r in caplog.records] == ["a table does not fit in memory"]
    assert [str(w.message) for w in caught] == ["something new"]
