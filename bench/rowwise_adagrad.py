"""Row-wise Adagrad on a sparse embedding gradient: fbgemm's EXACT_ROWWISE_ADAGRAD in plain PyTorch.

The optimizer plexrec's Trainer gives its tables (recsys/train.py: fbgemm's fused kernel,
EmbOptimType.EXACT_ROWWISE_ADAGRAD, eps 1e-8, weight decay 0), written out for a plain
``nn.EmbeddingBag(sparse=True)`` so that bench/train_throughput.py's baseline runs the same
update. For every row r a batch reads, with g its gradient summed over the batch (D values):

    state[r] += mean(g ** 2)                      one accumulator per row, not one per element
    w[r]     -= lr * g / (sqrt(state[r]) + eps)

Rows the batch does not read keep their weights and state. This is fbgemm's
``rowwise_adagrad`` (fbgemm_gpu/codegen/genscript/optimizers.py, ``split_weight_update_cpu``)
with weight_decay_mode 0; fbgemm's weight decay modes are not implemented here.
tests/test_rowwise_adagrad.py checks it against a dense reference and against fbgemm's kernel.
"""

from __future__ import annotations

import torch

# recsys/train.py passes this eps to fbgemm's fused row-wise Adagrad (and the config's embedding_lr)
TRAINER_EPS = 1e-8


def rowwise_adagrad_update(weight: torch.Tensor, grad: torch.Tensor, row_sum: torch.Tensor,
                           lr: float, eps: float) -> None:
    """One row-wise Adagrad step in place: ``weight`` [rows, D], ``grad`` its sparse COO gradient,
    ``row_sum`` [rows] the per-row sums of mean squared gradients."""
    grad = grad.coalesce()  # one gradient row per table row read: repeated lookups summed
    rows, g = grad.indices()[0], grad.values()
    row_sum.index_add_(0, rows, g.square().mean(dim=1))
    multiplier = lr / (row_sum[rows].sqrt() + eps)
    weight.index_add_(0, rows, g * -multiplier.unsqueeze(1))


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for 2-D parameters with sparse gradients (``nn.EmbeddingBag(sparse=True)``).

    State per parameter: ``sum``, one float per row (fbgemm's ``momentum1``), starting at 0.
    """

    def __init__(self, params, lr: float, eps: float = TRAINER_EPS):
        if lr < 0 or eps < 0:
            raise ValueError(f"lr and eps must be >= 0, got lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                if not weight.grad.is_sparse or weight.dim() != 2:
                    raise TypeError("RowWiseAdagrad updates 2-D parameters with sparse gradients "
                                    "(nn.EmbeddingBag(sparse=True)); got a "
                                    f"{'sparse' if weight.grad.is_sparse else 'dense'} gradient "
                                    f"of a {weight.dim()}-D parameter")
                state = self.state[weight]
                if "sum" not in state:
                    state["sum"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                rowwise_adagrad_update(weight, weight.grad, state["sum"], group["lr"], group["eps"])
        return loss
