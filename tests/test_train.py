import json

import numpy as np
import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys.config import ConfigError, FeatureConfig, load_config
from recsys.data.batching import make_batch
from recsys.embeddings import UnifiedEmbedding
from recsys.export import ModelArtifactError, load_model, read_manifest
from recsys.train import CheckpointMismatchError, Trainer
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

    resumed = Trainer(config, examples=small_examples, out_dir=tmp_path / "b")
    assert resumed.train_step(next(resumed.batches())) != pytest.approx(expected[0], abs=1e-6)  # a fresh model differs
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
    assert not list((tmp_path / "models").glob("*.pt*"))  # nothing pickled


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
    done = subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "plexrec train: features.user_id.probes = 0: a feature needs at least 1 probe" in done.stderr
    assert "Traceback" not in done.stderr
