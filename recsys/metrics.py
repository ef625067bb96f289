"""Ranking metrics: AUC, GAUC (per-user AUC weighted by the user's examples), log loss."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC averaged with weights = the user's example count.

    Users whose examples are all positive or all negative have no AUC and are
    left out, as in the DIN paper's definition; nan when no user is left.

    Vectorised: one sort by (user, score), then each user's AUC is the
    Mann-Whitney U from the sum of its positives' ranks within the user, tied
    scores taking their average rank, so a tied (positive, negative) pair
    counts 1/2, as in ``sklearn.metrics.roc_auc_score``.
    """
    users, labels, scores = np.asarray(users).ravel(), np.asarray(labels).ravel(), np.asarray(scores).ravel()
    n = len(labels)
    if n == 0:
        return float("nan")
    order = np.lexsort((scores, users))  # by user, then by score
    users, positive, scores = users[order], labels[order] == 1, scores[order]
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_tie = new_user.copy()  # a tie group: one user, one score
    new_tie[1:] |= scores[1:] != scores[:-1]
    user_starts = np.flatnonzero(new_user)
    tie_starts = np.flatnonzero(new_tie)
    tie_ends = np.append(tie_starts[1:], n)
    # twice the 1-based average rank within the user of the tie group at each position (an integer)
    user_start_of = user_starts[np.cumsum(new_user) - 1]
    doubled_rank = (tie_starts + tie_ends + 1)[np.cumsum(new_tie) - 1] - 2 * user_start_of
    sizes = np.diff(np.append(user_starts, n))
    n_pos = np.add.reduceat(positive.astype(np.int64), user_starts)
    doubled_rank_sum = np.add.reduceat(np.where(positive, doubled_rank, 0), user_starts)
    n_neg = sizes - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return float("nan")
    n_pos, n_neg, sizes = n_pos[both], n_neg[both], sizes[both]
    doubled_u = doubled_rank_sum[both] - n_pos * (n_pos + 1)  # 2 * Mann-Whitney U of the positives
    user_auc = doubled_u / (2.0 * n_pos * n_neg)
    return float(np.dot(sizes, user_auc) / sizes.sum())


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probabilities, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def ranking_metrics(users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, probabilities),
        "gauc": gauc(users, labels, probabilities),
        "logloss": log_loss(labels, probabilities),
        "examples": int(len(labels)),
    }
