"""Online features of one user and their candidates -> the model's input batch.

The online store's rows are laid out as the point-in-time join's rows and go
through ``features.examples.examples_from_feature_rows`` and
``recsys.data.batching.make_batch``, the code training uses: serving has no
second feature pipeline that could drift from training's.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from features.examples import ITEM_PROFILE_COLUMNS, USER_PROFILE_COLUMNS, examples_from_feature_rows
from features.online import ItemFeatures, UserFeatures
from recsys.data.batching import Batch, make_batch
from recsys.data.examples import DERIVED_DENSE, value_to_id
from recsys.sequence import SharedHistories

# an item the store has never seen still needs a category (its first genre); ML-100K's own word for none
COLD_START_CATEGORY = "unknown"
# what the online store can supply; a model trained on anything else cannot be served from it
SERVABLE_FEATURES = {"user_id", "item_id", "item_category", *USER_PROFILE_COLUMNS, *ITEM_PROFILE_COLUMNS} - {"category"}
SERVABLE_DENSE = list(DERIVED_DENSE)


def item_category(item: ItemFeatures) -> str:
    return item.profile.get("category") or COLD_START_CATEGORY


def feature_rows(user: UserFeatures, items: list[ItemFeatures], now_seconds: int | None = None,
                 history_length: int = 0) -> pd.DataFrame:
    """One feature row per candidate, as the ``ranker`` feature service's join returns it, with
    the user's ``history_length`` most recent items (what the model reads: make_batch would cut
    a longer one to that anyway; 0 for a model without history or given shared histories)."""
    now_seconds = int(time.time()) if now_seconds is None else now_seconds
    n = len(items)
    history = user.history_item_ids[-history_length:] if history_length else []
    stamps = user.history_timestamps[-history_length:] if history_length else []
    columns = {
        "user_id": np.full(n, user.user_id, dtype=np.int64),
        "item_id": np.array([i.item_id for i in items], dtype=np.int64),
        "timestamp": np.full(n, now_seconds, dtype=np.int64),
        "rating": np.zeros(n),  # no label at serving time
        "user_interaction_count": np.full(n, user.interaction_count, dtype=np.int64),
        "item_interaction_count": np.array([i.interaction_count for i in items], dtype=np.int64),
        "history_item_ids": [history] * n,
        "history_timestamps": [stamps] * n,
    }
    for column in USER_PROFILE_COLUMNS:
        columns[column] = [user.profile.get(column)] * n
    columns["genres"] = [list(i.profile.get("genres") or [COLD_START_CATEGORY]) for i in items]
    columns["release_year"] = pd.array([i.profile.get("release_year") for i in items], dtype="Int64")
    columns["category"] = [item_category(i) for i in items]
    return pd.DataFrame(columns)


def model_batch(requests: list[tuple[UserFeatures, list[ItemFeatures]]], history_items: dict[int, ItemFeatures],
                feature_names: list[str], history_length: int, share_histories: bool = False,
                now_seconds: int | None = None) -> tuple[Batch, SharedHistories | None]:
    """One batch for several (user, candidates) requests, rows in request order then candidate
    order; ``history_items`` gives the categories of the users' history items (a sequence
    model reads them).

    ``share_histories``: each user's history goes into SharedHistories once instead of into
    every candidate row (same model output, tested; the search then reads G x L behaviours,
    not B x L). The batch's history keys are left out then.
    """
    now_seconds = int(time.time()) if now_seconds is None else now_seconds
    share = share_histories and history_length > 0
    rows = pd.concat([feature_rows(user, items, now_seconds, 0 if share else history_length)
                      for user, items in requests], ignore_index=True)
    categories = {item_id: item_category(item) for item_id, item in history_items.items()}
    examples = examples_from_feature_rows(rows, item_categories=categories)
    # examples come sorted by user (stable, one timestamp): find each request row's place
    order = np.argsort(rows["user_id"].to_numpy(), kind="stable")
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    batch = make_batch(examples, place, feature_names, 0 if share else history_length)
    if not share:
        return batch, None
    # the most recent history_length items, oldest first, and their categories: what make_batch
    # and examples_from_feature_rows give each row
    histories = [user.history_item_ids[-history_length:] if history_length else [] for user, _ in requests]
    items = np.array([i for history in histories for i in history], dtype=np.int64)
    category_ids = {i: value_to_id(categories.get(i, COLD_START_CATEGORY)) for i in set(items.tolist())}
    shared = SharedHistories(
        items=torch.from_numpy(items),
        categories=torch.tensor([category_ids[i] for i in items.tolist()], dtype=torch.int64),
        lengths=torch.tensor([len(history) for history in histories], dtype=torch.int64),
        row_group=torch.from_numpy(np.repeat(np.arange(len(requests)), [len(items) for _, items in requests])))
    return batch, shared
