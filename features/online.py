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
An item's published embeddings carry the version that computed them and whether they are
the served version's own (``embeddings_valid_for``: features/publish.py decides, from the
publish instants in the offline files' footers); the cache also empties once the served
version's publish completes. The scoring server reads none (``published_vectors=False``): it
computes an item's vectors from the model and the item's online profile (serving/inputs.py),
so a vector published from another profile (the offline one, before the stream changed the
item) can never score an item; published embeddings are for other consumers.

The cache is bounded (``ItemCache``: at most ``max_cached_items`` entries and
``max_cached_bytes`` of estimated memory, least recently used evicted first): item
ids come from callers, and an unknown id is cached like a known one, so without a
bound any client could grow the server's memory by asking for ids nobody has.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

from features.publish import PublishedVersions
from features.store import StoreError, describe_store, read_store_meta
from features.schema import CATEGORY_FEATURE, DatasetSchema


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
    model_version: str | None = None  # the version whose publish wrote (computed) these vectors
    # the served version (use_model_version) when these are its own vectors: written by its publish, or
    # by one before it that its publish left alone (features/publish.py); else None
    embeddings_valid_for: str | None = None


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
ITEM_STATE_FEATURES = [f"item_profile:{CATEGORY_FEATURE}", "item_counters:interaction_count"]
EMBEDDING_FEATURES = ["item_embeddings:attention_embedding", "item_embeddings:representation_embedding",
                      "item_embeddings:model_version"]


# a cached item with two 64-dimensional embeddings takes about 5 KB (mostly the floats), an unknown one
# about 0.6 KB (tracemalloc, CPython 3.11): the byte bound binds first for known items, the entry bound
# for a stream of unknown ids
DEFAULT_MAX_CACHED_ITEMS = 100_000
DEFAULT_MAX_CACHED_BYTES = 256 << 20


def estimated_bytes(value: Any) -> int:
    """Roughly what ``value`` holds in CPython: sys.getsizeof of it and of every object it refers to
    (containers and dataclasses followed). Shared objects (small ints, interned strings, None) are
    counted each time, so this errs on the high side, which is the safe side for a memory bound."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(estimated_bytes(k) + estimated_bytes(v) for k, v in value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        size += sum(estimated_bytes(v) for v in value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        # the attribute dict and the values; its keys are the field names, interned once per process
        size += sys.getsizeof(vars(value)) + sum(estimated_bytes(v) for v in vars(value).values())
    return size


@dataclass(slots=True)
class _CachedItem:
    features: ItemFeatures
    stored_at: float
    size: int  # estimated bytes of the entry: the features, the key, the bookkeeping


# what one entry costs besides its features: the _CachedItem and its float, the key, the OrderedDict's
# slot and link (the ~100 B of the last two not visible to getsizeof)
_ENTRY_OVERHEAD = sys.getsizeof(_CachedItem(ItemFeatures(item_id=0), 0.0, 0)) + 2 * sys.getsizeof(2**40) + 100


class ItemCache:
    """Item features by id, least recently used first out, bounded in entries and in estimated bytes.

    Safe to share between threads (serving reads the store on a pool). ``hits``, ``misses``,
    ``evictions``, ``len()`` and ``bytes`` are its own counters (metrics, tests).
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_CACHED_ITEMS, max_bytes: int = DEFAULT_MAX_CACHED_BYTES,
                 ttl_seconds: float = 60.0) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"the item cache needs room for at least one entry (got {max_entries} entries, "
                             f"{max_bytes} bytes)")
        self.max_entries, self.max_bytes, self.ttl_seconds = max_entries, max_bytes, ttl_seconds
        self._entries: OrderedDict[int, _CachedItem] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item_id: int) -> bool:
        return item_id in self._entries

    def ids(self) -> list[int]:
        """The cached ids, least recently used first (the next to be evicted)."""
        with self._lock:
            return list(self._entries)

    def get(self, item_id: int, now: float) -> ItemFeatures | None:
        """The cached features, or None when absent or older than the TTL (a miss either way)."""
        with self._lock:
            entry = self._entries.get(item_id)
            if entry is None or now - entry.stored_at >= self.ttl_seconds:
                self.misses += 1
                return None
            self._entries.move_to_end(item_id)
            self.hits += 1
            return entry.features

    def get_many(self, item_ids: list[int], now: float) -> tuple[dict[int, ItemFeatures], list[int]]:
        """``get`` of several ids under one lock: (the cached features by id, the ids missed, in order)."""
        ttl = self.ttl_seconds
        with self._lock:
            entries = self._entries
            # map and comprehensions, not a loop of statements: a call looks up hundreds of ids, mostly hits
            cached = list(map(entries.get, item_ids))
            fresh = [entry is not None and now - entry.stored_at < ttl for entry in cached]
            hit_ids = list(compress(item_ids, fresh))
            found = dict(zip(hit_ids, [entry.features for entry in compress(cached, fresh)]))
            deque(map(entries.move_to_end, hit_ids), maxlen=0)
            missing = [item_id for item_id, ok in zip(item_ids, fresh) if not ok]
            self.hits += len(found)
            self.misses += len(missing)
        return found, missing

    @staticmethod
    def entry_bytes(features: ItemFeatures) -> int:
        """What caching ``features`` counts against ``max_bytes``."""
        return estimated_bytes(features) + _ENTRY_OVERHEAD

    def put(self, item_id: int, features: ItemFeatures, now: float) -> None:
        size = self.entry_bytes(features)  # outside the lock: it walks the embeddings
        with self._lock:
            previous = self._entries.pop(item_id, None)
            if previous is not None:
                self.bytes -= previous.size
            if size > self.max_bytes:  # it would push out everything else, then itself
                return
            self._entries[item_id] = _CachedItem(features, now, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.size
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def _key(feature: str) -> str:
    """A feature reference as Feast's full-feature-name result names it: view__feature (full names, so
    a schema column never collides with another view's feature such as interaction_count)."""
    return feature.replace(":", "__", 1)


class OnlineFeatures:
    def __init__(self, store, meta: dict | None = None, *, ttl_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_cached_items: int = DEFAULT_MAX_CACHED_ITEMS,
                 max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES, published_vectors: bool = True) -> None:
        """``meta``: the store's store.json (default: read from the store's data directory);
        ``published_vectors``: whether items carry the store's published embeddings (one more view
        read per miss, and most of a cached item's bytes; the scoring server reads none)."""
        self.store, self.ttl_seconds, self.clock = store, ttl_seconds, clock
        self.meta = read_store_meta(store.config.repo_path) if meta is None else meta
        self.schema = DatasetSchema.from_dict(self.meta["schema"], where="store.json schema")
        self.user_columns = self.schema.users.columns
        self.item_columns = self.schema.items.columns
        # user_profile exists only when the schema declares users columns (features/repo/definitions.py)
        self.user_features = [f"user_profile:{c}" for c in self.user_columns] + HISTORY_FEATURES
        self.published_vectors = published_vectors
        self.item_features = [f"item_profile:{c}" for c in self.item_columns] + ITEM_STATE_FEATURES + (
            EMBEDDING_FEATURES if published_vectors else [])
        self.model_version: str | None = None
        self.item_cache = ItemCache(max_cached_items, max_cached_bytes, ttl_seconds)
        # which published versions' vectors are the served version's own (the files' publish instants)
        self.published_versions = PublishedVersions(store.config.repo_path)
        self._served_version_published = False
        self._store_backend = None  # the online store back end, made on first read
        self._views: dict[str, Any] = {}

    @property
    def cache_hits(self) -> int:
        return self.item_cache.hits

    @property
    def cache_misses(self) -> int:
        return self.item_cache.misses

    @property
    def history_length(self) -> int:
        """How many behaviours a user's stored history holds at most (store.json)."""
        return int(self.meta["history_length"])

    def use_model_version(self, version: str) -> None:
        """Serving switched models: item embeddings of the old version are stale."""
        if version != self.model_version:
            self.model_version = version
            self.item_cache.clear()
            self._served_version_published = (self.published_vectors
                                              and self.published_versions.published_at(version) is not None)

    def _check_publish(self) -> None:
        """Once the served version's publish completes (it follows the export, which serving may load
        first), the cached items are read again: their rows may now be (or be valid for) its own."""
        if (self.published_vectors and self.model_version is not None and not self._served_version_published
                and self.published_versions.published_at(self.model_version) is not None):
            self._served_version_published = True
            self.item_cache.clear()

    def user(self, user_id: int) -> UserFeatures:
        return self.users([user_id])[0]

    def users(self, user_ids: list[int]) -> list[UserFeatures]:
        """One read for many users; an object per position (a user asked for twice gets two: each
        call sets its own context on it)."""
        distinct = list(dict.fromkeys(user_ids))
        rows = dict(zip(distinct, self._read(self.user_features, "user_id", distinct)))
        return [UserFeatures(user_id=user_id, profile=_present(row, "user_profile", self.user_columns),
                             history_item_ids=list(row["user_history__history_item_ids"] or []),
                             history_timestamps=list(row["user_history__history_timestamps"] or []),
                             interaction_count=int(row["user_history__interaction_count"] or 0))
                for user_id in user_ids for row in (rows[user_id],)]

    def items(self, item_ids: list[int]) -> dict[int, ItemFeatures]:
        self._check_publish()
        now = self.clock()
        found, missing = self.item_cache.get_many(list(dict.fromkeys(item_ids)), now)
        if missing:
            for item_id, row in zip(missing, self._read(self.item_features, "item_id", missing)):
                features = self._item_features(item_id, row)
                self.item_cache.put(item_id, features, now)
                found[item_id] = features
            return {item_id: found[item_id] for item_id in item_ids}
        return found  # all cached: already in first-seen order

    def _item_features(self, item_id: int, row: dict[str, Any]) -> ItemFeatures:
        if not self.published_vectors:
            return ItemFeatures(item_id=item_id, profile=_present(row, "item_profile", self.item_columns),
                                category=row[f"item_profile__{CATEGORY_FEATURE}"],
                                interaction_count=int(row["item_counters__interaction_count"] or 0))
        return ItemFeatures(
            item_id=item_id, profile=_present(row, "item_profile", self.item_columns),
            category=row[f"item_profile__{CATEGORY_FEATURE}"],
            interaction_count=int(row["item_counters__interaction_count"] or 0),
            attention_embedding=list(row["item_embeddings__attention_embedding"] or []),
            representation_embedding=list(row["item_embeddings__representation_embedding"] or []),
            model_version=(version := row["item_embeddings__model_version"]),
            embeddings_valid_for=(self.model_version if self.published_versions.valid_for(version, self.model_version)
                                  else None))

    def _read(self, features: list[str], key: str, ids: list[int]) -> list[dict[str, Any]]:
        """One dict per id of ``features`` (view:feature) under their full names (view__feature);
        None for a value the store does not have."""
        for attempt in range(RETRIES):
            try:
                return self._read_once(features, key, ids)
            except UNREACHABLE as exc:
                if attempt == RETRIES - 1:
                    raise StoreError(f"online store {describe_store(self.store)} unreachable after {RETRIES} "
                                     f"tries: {type(exc).__name__}: {exc}") from exc
                time.sleep(RETRY_PAUSE_SECONDS * 2 ** attempt)  # a restarting server may come back
        raise AssertionError("unreachable")

    def _read_once(self, features: list[str], key: str, ids: list[int]) -> list[dict[str, Any]]:
        # Feast's online-store interface (OnlineStore.online_read, what every back end implements), not
        # get_online_features: the same values without building its response, 0.23 ms for a user's two
        # views here against 0.69 ms. The views never expire (ttl=NO_EXPIRY), so no freshness check is lost.
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        keys = [EntityKey(join_keys=[key], entity_values=[Value(int64_val=int(i))]) for i in ids]
        rows: list[dict[str, Any]] = [dict.fromkeys(map(_key, features)) for _ in ids]
        by_view: dict[str, list[str]] = {}
        for feature in features:
            view, name = feature.split(":", 1)
            by_view.setdefault(view, []).append(name)
        for view, names in by_view.items():
            read = self._online_store().online_read(config=self.store.config, table=self._view(view),
                                                    entity_keys=keys, requested_features=names)
            for row, (_, values) in zip(rows, read):
                for name, value in (values or {}).items():
                    if name in names:
                        row[f"{view}__{name}"] = feast_value_type_to_python_type(value)
        return rows

    def _online_store(self):
        if self._store_backend is None:
            from feast.infra.online_stores.helpers import get_online_store_from_config

            self._store_backend = get_online_store_from_config(self.store.config.online_store)
        return self._store_backend

    def _view(self, name: str):
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self.store.get_feature_view(name)
        return view


def _present(row: dict[str, Any], view: str, columns: list[str]) -> dict[str, Any]:
    """A view's columns of one read row, under their schema names, missing values left out."""
    values = {c: row[f"{view}__{c}"] for c in columns}
    return {c: v for c, v in values.items() if v is not None and v == v}  # (v != v: a float NaN)
