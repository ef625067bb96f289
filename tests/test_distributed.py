"""Two gloo ranks with a row-wise sharded unified table against one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recsys.config import PROJECT_ROOT
from recsys.train import Trainer
from features.load import load_into_store
from features.store import open_store
from tests.distributed_worker import STEPS, config_for, streamed_config

# 2 ranks vs 1 process, float32: measured at most 1.2e-7 on the losses of 12 steps (a loss near
# 0.7 is 2 ulps away) and 1.2e-7 on the checkpoint's predictions; the README quotes this bound
AGREEMENT = 1e-6


def run_two_ranks(out, *worker_args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    done = subprocess.run([*torchrun, "tests/distributed_worker.py", str(out), *worker_args], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module", params=["none", "dare"])
def two_rank_run(request, tmp_path_factory):
    """The worker's result with sequence mode none, then dare (its attention table sharded too)."""
    out = tmp_path_factory.mktemp(f"two_ranks_{request.param}")
    return {"mode": request.param, **run_two_ranks(out, request.param)}


@pytest.mark.slow
def test_two_ranks_shard_the_unified_table_row_wise(two_rank_run):
    assert two_rank_run["world_size"] == 2
    assert two_rank_run["unified_sharding"] == "row_wise"
    assert two_rank_run["ranks"] == [0, 1]


@pytest.mark.slow
def test_two_rank_losses_match_one_process(two_rank_run, small_examples, tmp_path):
    trainer = Trainer(config_for(two_rank_run["mode"]), examples=small_examples, out_dir=tmp_path)
    batches = trainer.batches()
    one_rank = [trainer.train_step(next(batches)) for _ in range(STEPS)]
    print("max |2-rank - 1-rank| loss:", np.abs(np.subtract(two_rank_run["losses"], one_rank)).max())
    np.testing.assert_allclose(two_rank_run["losses"], one_rank, rtol=0, atol=AGREEMENT)
    assert one_rank[-1] < one_rank[0]  # it learned something along the way


@pytest.mark.slow
def test_a_two_rank_checkpoint_loads_into_one_rank(two_rank_run, small_examples, tmp_path):
    trainer = Trainer(config_for(two_rank_run["mode"]), examples=small_examples, out_dir=tmp_path)
    trainer.load_checkpoint(two_rank_run["checkpoint"])
    assert trainer.global_step == STEPS
    predictions = trainer.predict(trainer.eval_examples["test"])
    print("max |2-rank - 1-rank| prediction:", np.abs(predictions - two_rank_run["predictions"]).max())
    np.testing.assert_allclose(predictions, two_rank_run["predictions"], rtol=0, atol=AGREEMENT)
    trainer.train_step(next(trainer.batches()))  # the resharded optimizer state steps too


@pytest.mark.slow
def test_two_ranks_stream_their_own_shards_and_gather_the_whole_evaluation(ml100k_tables, tmp_path_factory):
    """One epoch streamed from the store's user shards on 2 ranks (recsys/data/example_stream.py):
    the same steps on both, each drawing its own shards' examples; the test part scored by both
    and gathered is every test example once, with the AUC one process gets from the checkpoint."""
    store = tmp_path_factory.mktemp("store")
    ratings = ml100k_tables.interactions
    load_into_store(open_store("local", store), ml100k_tables.with_interactions(ratings[ratings.user_id <= 120]),
                    store, history_length=50)
    result = run_two_ranks(tmp_path_factory.mktemp("two_ranks_streamed"), "dare", str(store))

    one = Trainer(streamed_config(str(store)), out_dir=tmp_path_factory.mktemp("one_rank_streamed"))
    (steps0, drawn0), (steps1, drawn1) = result["steps_and_drawn"]
    assert steps0 == steps1 == one.train_examples.steps(one.config.train.batch_size, 2)
    assert result["train_examples"] == len(one.train_examples)
    # one batch size on both ranks at every step: the rank with fewer examples draws all of them
    assert drawn0 == drawn1 == min(one.train_examples.rank_counts(2))
    assert result["test_predictions"] == result["test_pairs"] == len(one.eval_examples["test"])
    one.load_checkpoint(result["checkpoint"])
    assert abs(one.evaluate("test")["auc"] - result["test_auc"]) <= AGREEMENT
