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
    left out, as in the DIN paper's definition.
    """
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
