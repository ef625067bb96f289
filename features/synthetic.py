"""A seedable long-sequence data set with planted structure, in the generic loader's schema.

Every user browses items of a few interest clusters (each cluster holds several
item categories) for a long time: 'context' rows, which form histories but are
not examples. Then come the user's target impressions (the examples). A target's
category is always outside the user's clusters, and for a share of targets a few
items of that category are planted *far back* in the history (older than the
last ``recent_window`` behaviours). Clicks depend on the plant:

    P(click) = p_related     if items of the target's category are in the history
             = p_unrelated   otherwise                       (both noisy, not 0/1)

So a model has to find a handful of relevant behaviours among ~1,000, none of
them recent: what DARE's search is for. The relevant behaviours of an example
are exactly the history items that share the target's category (no other item
of that category ever enters the user's history): ``relevant_positions`` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.examples import Examples
from features.schema import DatasetSchema


@dataclass
class SyntheticConfig:
    num_users: int = 2_000
    num_clusters: int = 8
    categories_per_cluster: int = 10
    items_per_category: int = 100
    clusters_per_user: int = 2
    min_history: int = 600
    max_history: int = 960  # context behaviours per user (+ targets: histories up to 1,000)
    targets_per_user: int = 40  # the last `eval_targets` are test, the ones before validation
    eval_targets: int = 3
    planted_share: float = 0.5  # targets whose category is planted in the history
    relevant_min: int = 3
    relevant_max: int = 10  # planted behaviours per such target
    recent_window: int = 50  # planted behaviours are older than this many behaviours before the targets
    p_related: float = 0.85
    p_unrelated: float = 0.15
    seed: int = 0


SYNTHETIC_SCHEMA = dict(name="synthetic", format="synthetic", user="user_id", item="item_id", timestamp="timestamp",
                        label="label", category="category", split="split")


def generate(config: SyntheticConfig = SyntheticConfig()) -> tuple[pd.DataFrame, DatasetSchema]:
    """The interactions frame (one row per behaviour or target) and its schema."""
    c = config
    if c.recent_window + c.relevant_max * c.targets_per_user >= c.min_history:
        raise ValueError("min_history leaves no room to plant behaviours older than recent_window")
    if (c.num_clusters - c.clusters_per_user) * c.categories_per_cluster < c.targets_per_user:
        raise ValueError("targets_per_user exceeds the categories outside a user's clusters: "
                         "raise num_clusters or categories_per_cluster")
    rng = np.random.default_rng(c.seed)
    num_categories = c.num_clusters * c.categories_per_cluster
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("user_id", "item_id", "category", "label", "split")}

    def items_of(categories: np.ndarray) -> np.ndarray:
        return categories * c.items_per_category + rng.integers(0, c.items_per_category, len(categories)) + 1

    for user in range(1, c.num_users + 1):
        clusters = rng.choice(c.num_clusters, c.clusters_per_user, replace=False)
        own = (clusters[:, None] * c.categories_per_cluster + np.arange(c.categories_per_cluster)).ravel()
        foreign = np.setdiff1d(np.arange(num_categories), own)
        length = int(rng.integers(c.min_history, c.max_history + 1))
        context_categories = rng.choice(own, length)

        target_categories = rng.choice(foreign, c.targets_per_user, replace=False)
        planted = rng.random(c.targets_per_user) < c.planted_share
        # overwrite old context behaviours, each slot at most once so no plant erases another
        counts = rng.integers(c.relevant_min, c.relevant_max + 1, int(planted.sum()))
        slots = rng.choice(length - c.recent_window, int(counts.sum()), replace=False)
        context_categories[slots] = np.repeat(target_categories[planted], counts)
        clicked = rng.random(c.targets_per_user) < np.where(planted, c.p_related, c.p_unrelated)

        categories = np.concatenate([context_categories, target_categories])
        columns["user_id"].append(np.full(len(categories), user))
        columns["item_id"].append(items_of(categories))
        columns["category"].append(categories)
        columns["label"].append(np.concatenate([np.ones(length, dtype=int), clicked.astype(int)]))
        split = (["train"] * (c.targets_per_user - 2 * c.eval_targets)
                 + ["valid"] * c.eval_targets + ["test"] * c.eval_targets)
        columns["split"].append(np.array(["context"] * length + split))

    frame = pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})
    # one behaviour a minute per user
    frame["timestamp"] = 1_700_000_000 + 60 * frame.groupby("user_id").cumcount()
    return frame, DatasetSchema(**SYNTHETIC_SCHEMA)


def relevant_positions(examples: Examples, index: int, max_length: int) -> np.ndarray:
    """Positions in example ``index``'s (truncated) history of the behaviours that share
    its target's category: for synthetic data, exactly the planted ones."""
    start, end, _ = examples.history_ranges(np.array([index]), max_length)
    history_categories = examples.sequence_categories[start[0]:end[0]]
    target_category = examples.feature_values["item_category"][index]
    return np.flatnonzero(history_categories == target_category)
