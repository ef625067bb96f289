"""bench/rowwise_adagrad.py: the plain baseline's row-wise Adagrad is the Trainer's optimizer.

Checked on a tiny table against a dense reference written from the definition and against
fbgemm's fused EXACT_ROWWISE_ADAGRAD kernel (the one TorchRec's fused compute kernel runs in
the Trainer), fed the same lookups and the same output gradients for several steps.
"""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                    SplitTableBatchedEmbeddingBagsCodegen)
from torch import nn

from bench.rowwise_adagrad import TRAINER_EPS, RowWiseAdagrad

ROWS, DIM, LR = 12, 8, 0.05
# bags per step: rows repeated inside a bag and across bags, an empty bag, rows never read (1, 2, 10, 11)
STEPS = [[[0, 3, 3], [5], [], [3, 7, 0, 0]],
         [[3], [4, 4, 9], [0, 8]],
         [[7, 3, 6], [6], [9, 0, 3, 5]]]


def _inputs(bags):
    indices = torch.tensor([r for bag in bags for r in bag], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(bag) for bag in bags], dtype=torch.int64).cumsum(0)
    return indices, offsets


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, DIM, generator=generator)
    upstream = [torch.randn(len(bags), DIM, generator=generator) for bags in STEPS]  # d loss / d pooled output
    return weight, upstream


def dense_reference(weight, upstream, lr, eps):
    """The definition, in float64 with loops: loss = sum_b <upstream_b, mean of bag b's rows>."""
    w = weight.double().clone()
    row_sum = torch.zeros(ROWS, dtype=torch.float64)
    for bags, out_grad in zip(STEPS, upstream):
        grad = torch.zeros_like(w)
        for b, bag in enumerate(bags):
            for row in bag:
                grad[row] += out_grad[b].double() / len(bag)
        for row in sorted({row for bag in bags for row in bag}):
            row_sum[row] += (grad[row] ** 2).mean()
            w[row] -= lr * grad[row] / (row_sum[row].sqrt() + eps)
    return w, row_sum


def plain_embedding_bag(weight, upstream, optimizer_class, **kwargs):
    bag = nn.EmbeddingBag(ROWS, DIM, mode="mean", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(weight)
    optimizer = optimizer_class(bag.parameters(), **kwargs)
    for bags, out_grad in zip(STEPS, upstream):
        indices, offsets = _inputs(bags)
        optimizer.zero_grad()
        (bag(indices, offsets[:-1]) * out_grad).sum().backward()
        optimizer.step()
    return bag.weight.detach(), optimizer


def fbgemm_fused(weight, upstream, lr, eps):
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=eps, pooling_mode=PoolingMode.MEAN)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(weight)
    for bags, out_grad in zip(STEPS, upstream):
        indices, offsets = _inputs(bags)
        (tbe(indices, offsets) * out_grad).sum().backward()  # the update happens inside backward
    (momentum,) = tbe.split_optimizer_states()[0]
    return tbe.split_embedding_weights()[0].detach().clone(), momentum.detach().clone()


def test_rowwise_adagrad_matches_the_dense_definition(problem):
    weight, upstream = problem
    expected_weight, expected_sum = dense_reference(weight, upstream, LR, TRAINER_EPS)
    got_weight, optimizer = plain_embedding_bag(weight, upstream, RowWiseAdagrad, lr=LR, eps=TRAINER_EPS)
    (state,) = optimizer.state.values()
    torch.testing.assert_close(state["sum"].double(), expected_sum, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_weight.double(), expected_weight, rtol=1e-5, atol=1e-6)
    unread = [1, 2, 10, 11]
    assert torch.equal(got_weight[unread], weight[unread]) and not state["sum"][unread].any()


def test_rowwise_adagrad_matches_fbgemms_fused_kernel(problem):
    weight, upstream = problem
    fused_weight, fused_sum = fbgemm_fused(weight, upstream, LR, TRAINER_EPS)
    got_weight, optimizer = plain_embedding_bag(weight, upstream, RowWiseAdagrad, lr=LR, eps=TRAINER_EPS)
    (state,) = optimizer.state.values()
    assert not torch.equal(fused_weight, weight)  # the kernel did update
    torch.testing.assert_close(state["sum"], fused_sum, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_weight, fused_weight, rtol=1e-5, atol=1e-6)

    # the old baseline's optimizer: element-wise Adagrad is a different update, not a rounding away
    elementwise, _ = plain_embedding_bag(weight, upstream, torch.optim.Adagrad, lr=LR, eps=TRAINER_EPS)
    assert (elementwise - fused_weight).abs().max() > 1e-3


def test_rowwise_adagrad_refuses_a_dense_gradient():
    table = nn.EmbeddingBag(ROWS, DIM, mode="mean", sparse=False)
    optimizer = RowWiseAdagrad(table.parameters(), lr=LR)
    indices, offsets = _inputs(STEPS[0])
    table(indices, offsets[:-1]).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        optimizer.step()


def test_the_bench_uses_the_trainers_table_optimizer(small_examples, tmp_path):
    """The Trainer's fused tables run EXACT_ROWWISE_ADAGRAD with the config's lr and TRAINER_EPS."""
    from recsys.train import Trainer
    from tests.conftest import small_config

    config = small_config()
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path)
    # a sharded collection keeps its fbgemm kernels in a plain list, _lookups, out of modules()
    kernels = [kernel for module in trainer.model.modules() for lookup in getattr(module, "_lookups", [])
               for kernel in lookup.modules() if isinstance(kernel, SplitTableBatchedEmbeddingBagsCodegen)]
    assert kernels
    for kernel in kernels:
        assert kernel.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD
        assert kernel.optimizer_args.eps == TRAINER_EPS
        assert kernel.optimizer_args.weight_decay == 0.0  # RowWiseAdagrad has no weight decay
        assert kernel.get_learning_rate() == pytest.approx(config.train.embedding_lr)
