"""The softmax's logit scale tau (sequence.logit_scale / learn_logit_scale, issue 22 item 2)."""

import math

import pytest
import torch

from features.errors import ConfigError
from recsys.config import SequenceConfig, load_config
from recsys.embeddings import UnifiedEmbedding
from recsys.sequence import SequenceEncoder, dare_reference
from tests.test_sequence import DIM, HISTORIES, REPRESENTATION, TARGETS, batch_kjt, run_block


def parts(mode: str = "dare", logit_scale: float = 1.0, learn: bool = False, top_k: int = 3):
    torch.manual_seed(0)
    config = SequenceConfig(mode=mode, top_k=top_k, attention_dim=8, attention_rows=101, attention_probes=1,
                            position_buckets=4, logit_scale=logit_scale, learn_logit_scale=learn)
    encoder = SequenceEncoder(config, REPRESENTATION, DIM)
    unified = UnifiedEmbedding(REPRESENTATION, 97, DIM, extra_lookups=encoder.extra_lookups())
    with torch.no_grad():  # rows large enough that the softmax is far from uniform
        next(iter(encoder.space.ebc.embedding_bags.values())).weight.normal_()
    return config, encoder, unified


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, 64])
def test_dare_with_a_logit_scale_matches_the_plain_reference(learn, top_k):
    config, encoder, unified = parts(logit_scale=5.0, learn=learn, top_k=top_k)
    out, _ = run_block(encoder, unified, batch_kjt())
    want = dare_reference(encoder.space.ebc.embedding_bags["attention"].weight.detach(),
                          unified.ebc.embedding_bags["unified"].weight.detach(), config, REPRESENTATION,
                          TARGETS, HISTORIES)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-6)
    # and the scale matters: the reference at tau = 1 differs
    plain = dare_reference(encoder.space.ebc.embedding_bags["attention"].weight.detach(),
                           unified.ebc.embedding_bags["unified"].weight.detach(), config, REPRESENTATION,
                           TARGETS, HISTORIES, logit_scale=1.0)
    if top_k > 1:
        assert (plain - want).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["dare", "coupled"])
def test_the_scale_sharpens_the_softmax_and_keeps_the_top_k(mode):
    _, flat, unified = parts(mode, logit_scale=1.0)
    _, sharp, _ = parts(mode, logit_scale=20.0)
    a, b = flat.search(batch_kjt()), sharp.search(batch_kjt())
    assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)
    rows = a.valid.sum(dim=1) > 1
    assert (b.weights.max(dim=1).values[rows] > a.weights.max(dim=1).values[rows]).all()


@pytest.mark.parametrize("mode", ["dare", "coupled"])
def test_a_learned_scale_gets_a_gradient_and_a_fixed_one_is_no_parameter(mode):
    _, encoder, unified = parts(mode, logit_scale=4.0, learn=True)
    assert math.isclose(float(encoder.logit_scale().detach()), 4.0, rel_tol=1e-6)
    out, _ = run_block(encoder, unified, batch_kjt())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert encoder.log_logit_scale.grad is not None and encoder.log_logit_scale.grad.abs() > 0
    _, fixed, _ = parts(mode, logit_scale=4.0, learn=False)
    assert not any("logit_scale" in name for name, _ in fixed.named_parameters())
    assert not any("logit_scale" in key for key in fixed.state_dict())


def test_a_learned_scale_moves_in_training(small_examples, tmp_path):
    from recsys.train import Trainer
    from tests.conftest import small_config

    config = small_config()
    config.sequence.mode, config.sequence.top_k, config.data.max_history = "dare", 4, 30
    config.sequence.logit_scale, config.sequence.learn_logit_scale = 8.0, True
    config.train.epochs = 1
    trainer = Trainer(config.validate(), examples=small_examples, out_dir=tmp_path)
    before = float(trainer.model.module.sequence.logit_scale().detach())
    trainer.train_epoch(progress=False)
    assert abs(float(trainer.model.module.sequence.logit_scale().detach()) - before) > 1e-3


@pytest.mark.parametrize("value", [0, -1.0, float("inf")])
def test_a_scale_that_is_not_positive_is_refused(value):
    with pytest.raises(ConfigError, match="sequence.logit_scale"):
        load_config(None, {"sequence.mode": "dare", "sequence.logit_scale": value})
