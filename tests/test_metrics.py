import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recsys.metrics import auc, gauc, log_loss


def pairwise_auc(labels, scores) -> float:
    """AUC by definition: the share of (positive, negative) pairs ranked right, ties half."""
    pos = [s for l, s in zip(labels, scores) if l == 1]
    neg = [s for l, s in zip(labels, scores) if l == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def gauc_reference(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """The plain per-user loop over sklearn's roc_auc_score (the former ``gauc``)."""
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    boundaries = np.flatnonzero(np.diff(users)) + 1
    total, weight = 0.0, 0
    for user_labels, user_scores in zip(np.split(labels, boundaries), np.split(scores, boundaries)):
        positives = user_labels.sum()
        if 0 < positives < len(user_labels):
            total += len(user_labels) * roc_auc_score(user_labels, user_scores)
            weight += len(user_labels)
    return total / weight if weight else float("nan")


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


def random_split(seed: int, num_users: int, rows: int, decimals: int | None, dtype=np.float64):
    """Users of varied sizes (a few large, many of one or two rows) under shuffled, non-contiguous
    ids; some users all positive, some all negative; scores rounded to ``decimals`` for ties."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**9, size=num_users, replace=False) - 5 * 10**8  # negative ids too
    users = ids[np.minimum(rng.zipf(1.5, rows) - 1, num_users - 1)]
    rate = rng.choice([0.0, 1.0, 0.1, 0.5, 0.9], size=num_users)[np.searchsorted(np.sort(ids), users)]
    labels = (rng.random(rows) < rate).astype(np.int64)
    scores = rng.random(rows) + 0.2 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return rng.permutation(users), labels, scores.astype(dtype)


@pytest.mark.parametrize("seed,num_users,rows,decimals,dtype", [
    (0, 50, 2000, 1, np.float64),   # many ties
    (1, 300, 5000, 2, np.float64),
    (2, 1000, 4715, None, np.float64),  # no ties
    (3, 200, 3000, 0, np.float64),  # scores in {0, 1}: almost everything tied
    (4, 400, 5000, 3, np.float32),
    (5, 400, 5000, None, np.float32),
])
def test_gauc_matches_the_per_user_sklearn_loop(seed, num_users, rows, decimals, dtype):
    users, labels, scores = random_split(seed, num_users, rows, decimals, dtype)
    assert len(np.unique(users)) > 10
    assert gauc(users, labels, scores) == pytest.approx(gauc_reference(users, labels, scores), abs=1e-9)


def test_gauc_with_float_labels_and_unsorted_users():
    users = np.array([9, 3, 9, 3, 7, 9, 3, 7, 7])
    labels = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # user 7 all positive
    scores = np.array([0.2, 0.4, 0.2, 0.4, 0.1, 0.9, 0.3, 0.5, 0.6], dtype=np.float32)
    assert gauc(users, labels, scores) == pytest.approx(gauc_reference(users, labels, scores), abs=1e-12)


def test_gauc_single_user_is_its_auc():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300), 1)
    users = np.full(300, 42)
    assert gauc(users, labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert gauc(users, labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_gauc_is_nan_when_no_user_has_both_classes():
    users = np.array([1, 1, 2, 2, 3])
    labels = np.array([1, 1, 0, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert math.isnan(gauc(users, labels, scores))
    assert math.isnan(gauc_reference(users, labels, scores))
    assert math.isnan(gauc(np.array([], dtype=np.int64), np.array([]), np.array([])))


def test_gauc_all_tied_scores_is_one_half():
    users = np.array([5, 5, 5, 8, 8, 8, 8])
    labels = np.array([1, 0, 1, 0, 1, 0, 0])
    assert gauc(users, labels, np.full(7, 0.25)) == 0.5


def test_log_loss():
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
