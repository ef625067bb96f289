"""Two gloo ranks with a row-wise sharded unified table against one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recsys.config import PROJECT_ROOT
from recsys.train import Trainer
from tests.distributed_worker import STEPS, config_for

# 2 ranks vs 1 process, float32: measured at most 1.2e-7 on the losses of 12 steps (a loss near
# 0.7 is 2 ulps away) and 1.2e-7 on the checkpoint's predictions; the README quotes this bound
AGREEMENT = 1e-6


@pytest.fixture(scope="module", params=["none", "dare"])
def two_rank_run(request, tmp_path_factory):
    """The worker's result with sequence mode none, then dare (its attention table sharded too)."""
    out = tmp_path_factory.mktemp(f"two_ranks_{request.param}")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    done = subprocess.run([*torchrun, "tests/distributed_worker.py", str(out), request.param], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"mode": request.param, **json.loads((out / "result.json").read_text())}


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
