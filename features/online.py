"""The online read API for serving: one user in one call, items through an in-process cache.

    online = OnlineFeatures(store)            # the schema from the store's store.json
    user = online.user(42)                    # profile, history, count
    items = online.items([1, 2, 3])           # {item id: profile, category, count, embeddings}

What is read follows the data set's schema (store.json, written by ``plexrec features
load``): the user_profile columns of its ``users`` group (when it has any) and
user_history; the item_profile columns of its ``items`` group, ``item_category``,
item_counters and item_embeddings. No data set's column names appear here.

No torch here (the serving process imports it; the ingester never does). Measured
with feast 0.67 on SQLite: one user reads in about 0.8 ms, 100 items in 20-30 ms,
too slow for every request, so item features and embeddings are cached. The cache
empties when serving moves to a new model version (``use_model_version``) and
entries expire after ``ttl_seconds``. Unknown users and items read as cold-start
defaults (empty profile, empty history, zero counts, no category), never as an error.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from features.store import StoreError, describe_store, read_store_meta
from recsys.data.schema import CATEGORY_FEATURE, DatasetSchema


@dataclass
class UserFeatures:
    user_id: int
    profile: dict[str, Any] = field(default_factory=dict)  # the users columns; missing values are left out
    history_item_ids: list[int] = field(default_factory=list)  # oldest first
    history_timestamps: list[int] = field(default_factory=list)
    interaction_count: int = 0
    # the call's context features (ScoreRequest.context, parsed by serving/inputs.py): not read from
    # the store, but like the profile one value for every candidate row of the call
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return bool(self.profile) or self.interaction_count > 0


@dataclass
class ItemFeatures:
    item_id: int
    profile: dict[str, Any] = field(default_factory=dict)  # the items columns; missing values are left out
    category: str | None = None  # item_category: the item's category value as text; None when unknown
    interaction_count: int = 0
    attention_embedding: list[float] = field(default_factory=list)
    representation_embedding: list[float] = field(default_factory=list)
    model_version: str | None = None


RETRIES = 3
RETRY_PAUSE_SECONDS = 0.1
# what a down or restarting server raises; anything else (an unknown view, ...) is not retried
UNREACHABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, sqlite3.OperationalError)
try:
    import redis.exceptions

    UNREACHABLE += (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
except ImportError:  # the redis client is only needed for the redis profile
    pass

HISTORY_FEATURES = ["user_history:history_item_ids", "user_history:history_timestamps",
                    "user_history:interaction_count"]
ITEM_STATE_FEATURES = [f"item_profile:{CATEGORY_FEATURE}", "item_counters:interaction_count",
                       "item_embeddings:attention_embedding", "item_embeddings:representation_embedding",
                       "item_embeddings:model_version"]


def _key(feature: str) -> str:
    """A feature reference as Feast's full-feature-name result names it: view__feature (full names, so
    a schema column never collides with another view's feature such as interaction_count)."""
    return feature.replace(":", "__", 1)


class OnlineFeatures:
    def __init__(self, store, meta: dict | None = None, *, ttl_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``meta``: the store's store.json (default: read from the store's data directory)."""
        self.store, self.ttl_seconds, self.clock = store, ttl_seconds, clock
        self.meta = read_store_meta(store.config.repo_path) if meta is None else meta
        self.schema = DatasetSchema.from_dict(self.meta["schema"], where="store.json schema")
        self.user_columns = self.schema.users.columns
        self.item_columns = self.schema.items.columns
        # user_profile exists only when the schema declares users columns (features/repo/definitions.py)
        self.user_features = [f"user_profile:{c}" for c in self.user_columns] + HISTORY_FEATURES
        self.item_features = [f"item_profile:{c}" for c in self.item_columns] + ITEM_STATE_FEATURES
        self.model_version: str | None = None
        self._items: dict[int, tuple[float, ItemFeatures]] = {}
        self.cache_hits = self.cache_misses = 0

    @property
    def history_length(self) -> int:
        """How many behaviours a user's stored history holds at most (store.json)."""
        return int(self.meta["history_length"])

    def use_model_version(self, version: str) -> None:
        """Serving switched models: item embeddings of the old version are stale."""
        if version != self.model_version:
            self.model_version = version
            self._items.clear()

    def user(self, user_id: int) -> UserFeatures:
        row = self._read(self.user_features, "user_id", [user_id])[0]
        return UserFeatures(user_id=user_id, profile=_present(row, "user_profile", self.user_columns),
                            history_item_ids=list(row["user_history__history_item_ids"] or []),
                            history_timestamps=list(row["user_history__history_timestamps"] or []),
                            interaction_count=int(row["user_history__interaction_count"] or 0))

    def items(self, item_ids: list[int]) -> dict[int, ItemFeatures]:
        now = self.clock()
        found, missing = {}, []
        for item_id in dict.fromkeys(item_ids):
            cached = self._items.get(item_id)
            if cached is not None and now - cached[0] < self.ttl_seconds:
                found[item_id] = cached[1]
            else:
                missing.append(item_id)
        self.cache_hits += len(found)
        self.cache_misses += len(missing)
        if missing:
            for item_id, row in zip(missing, self._read(self.item_features, "item_id", missing)):
                features = ItemFeatures(
                    item_id=item_id, profile=_present(row, "item_profile", self.item_columns),
                    category=row[f"item_profile__{CATEGORY_FEATURE}"],
                    interaction_count=int(row["item_counters__interaction_count"] or 0),
                    attention_embedding=list(row["item_embeddings__attention_embedding"] or []),
                    representation_embedding=list(row["item_embeddings__representation_embedding"] or []),
                    model_version=row["item_embeddings__model_version"])
                self._items[item_id] = (now, features)
                found[item_id] = features
        return {item_id: found[item_id] for item_id in item_ids}

    def _read(self, features: list[str], key: str, ids: list[int]) -> list[dict[str, Any]]:
        rows = [{key: int(i)} for i in ids]
        for attempt in range(RETRIES):
            try:
                table = self.store.get_online_features(features=features, entity_rows=rows,
                                                       full_feature_names=True).to_dict()
                break
            except UNREACHABLE as exc:
                if attempt == RETRIES - 1:
                    raise StoreError(f"online store {describe_store(self.store)} unreachable after {RETRIES} "
                                     f"tries: {type(exc).__name__}: {exc}") from exc
                time.sleep(RETRY_PAUSE_SECONDS * 2 ** attempt)  # a restarting server may come back
        columns = [_key(f) for f in features]
        return [{c: table[c][row] for c in columns} for row in range(len(ids))]


def _present(row: dict[str, Any], view: str, columns: list[str]) -> dict[str, Any]:
    """A view's columns of one read row, under their schema names, missing values left out."""
    values = {c: row[f"{view}__{c}"] for c in columns}
    return {c: v for c, v in values.items() if v is not None and v == v}  # (v != v: a float NaN)
