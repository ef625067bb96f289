import itertools

import numpy as np
import pytest

from recsys.metrics import auc, gauc, log_loss


def pairwise_auc(labels, scores) -> float:
    """AUC by definition: the share of (positive, negative) pairs ranked right, ties half."""
    pos = [s for l, s in zip(labels, scores) if l == 1]
    neg = [s for l, s in zip(labels, scores) if l == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_its_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounded: ties happen
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores))


def test_gauc_weights_users_by_examples_and_skips_one_class_users():
    users = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1])  # user 3 has only positives
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7, 0.5, 0.5])
    user1 = pairwise_auc(labels[:4], scores[:4])  # 0.5
    user2 = pairwise_auc(labels[4:6], scores[4:6])  # 0.0
    assert gauc(users, labels, scores) == pytest.approx((4 * user1 + 2 * user2) / 6)


def test_log_loss():
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
