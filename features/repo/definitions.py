"""plexrec's features, made from the data set's schema: entities, sources, views, push sources, services.

Training reads them from the offline store (point-in-time joins), serving from the
online store; the stream ingester pushes fresh histories and counters. The offline
tables are Parquet files under the data directory ($PLEXREC_DATA_DIR, default
.plexrec/ at the project root), written by `plexrec features load`, which also
writes ``store.json``: the schema and the Feast type of every column. This module
reads it and declares one view per concept, so `feast -c features/repo apply` (or
`plexrec features load`) registers the same objects for any data set:

    user_profile    the schema's users columns                      (absent without any)
    item_profile    the schema's items columns + item_category (text)
    user_history    history_item_ids, history_timestamps, interaction_count (+ the ingester's watermark)
    item_counters   interaction_count (+ the ingester's watermarks)
    item_embeddings attention / representation embeddings and their model version

Values are stored raw (strings stay strings): the model's hash turns them into rows,
so the store never needs to know about vocabularies or hashing.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bytes, Float32, Int64, String

DATA_DIR = Path(os.environ.get("PLEXREC_DATA_DIR", Path(__file__).resolve().parents[2] / ".plexrec")).resolve()
OFFLINE_DIR = DATA_DIR / "offline"
STORE_META = DATA_DIR / "store.json"
NO_EXPIRY = timedelta(0)
FEAST_TYPES = {"Int64": Int64, "String": String, "Float32": Float32,
               "Array(Int64)": Array(Int64), "Array(String)": Array(String)}

META = json.loads(STORE_META.read_text()) if STORE_META.is_file() else {"schema": None, "types": {}}
SCHEMA = META["schema"] or {}

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="a user, by raw id")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="an item, by raw id")


def _source(name: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=str(OFFLINE_DIR / f"{name}.parquet"),
                      timestamp_field="event_timestamp")


def _fields(group: str) -> list[Field]:
    spec = SCHEMA.get(group) or {}
    columns = [*spec.get("categorical", []), *spec.get("multi_valued", {}), *spec.get("numeric", [])]
    return [Field(name=c, dtype=FEAST_TYPES[META["types"][c]]) for c in columns]


profiles = []
if _fields("users"):
    user_profile = FeatureView(
        name="user_profile", entities=[user], ttl=NO_EXPIRY, source=_source("user_profile"),
        schema=_fields("users"), description=f"who the user is ({SCHEMA.get('name')}); changes rarely")
    profiles.append(user_profile)

item_profile = FeatureView(
    name="item_profile", entities=[item], ttl=NO_EXPIRY, source=_source("item_profile"),
    schema=[*_fields("items"), Field(name="item_category", dtype=String)],
    description=f"what the item is ({SCHEMA.get('name')}); item_category: its category value, as text")
profiles.append(item_profile)

# A history row stamped t holds the user's behaviours up to t, oldest first, at most the
# history length of store.json. Training joins "as of just before" the label (see
# features/training.py), so an example never sees its own instant.
user_history_push = PushSource(name="user_history_push", batch_source=_source("user_history"))
user_history = FeatureView(
    name="user_history", entities=[user], ttl=NO_EXPIRY, source=user_history_push,
    schema=[Field(name="history_item_ids", dtype=Array(Int64)),
            Field(name="history_timestamps", dtype=Array(Int64)),
            Field(name="interaction_count", dtype=Int64),
            # the stream ingester's watermark: "topic/partition" and offset of the last event applied
            # (its topic carries the topic's incarnation: "topic@id/partition", see features/ingest.py)
            Field(name="ingest_source", dtype=String),
            Field(name="ingest_offset", dtype=Int64),
            # 63-bit hashes of the event ids of the last behaviours applied (oldest first, a bounded
            # window), packed as big-endian int64: an event id seen again changes nothing. Bytes, not
            # Array(Int64): Feast converts arrays element by element, which halved the ingester's rate
            Field(name="recent_event_ids", dtype=Bytes),
            # the row's event_timestamp in microseconds, as written: the next write is stamped
            # later, because Feast's Redis store drops a write stamped at or before the stored one
            Field(name="stamp_us", dtype=Int64)],
    description="the user's recent behaviours and how many there have been; stream-updated")

item_counters_push = PushSource(name="item_counters_push", batch_source=_source("item_counters"))
item_counters = FeatureView(
    name="item_counters", entities=[item], ttl=NO_EXPIRY, source=item_counters_push,
    schema=[Field(name="interaction_count", dtype=Int64),
            # the ingester's watermarks: element p = offset of the last event applied from
            # partition p of topic ingest_topic
            Field(name="ingest_topic", dtype=String),
            Field(name="ingest_offsets", dtype=Array(Int64)),
            Field(name="recent_event_ids", dtype=Bytes),  # as user_history's
            Field(name="stamp_us", dtype=Int64)],
    description="how many behaviours the item has had; stream-updated")

# one Parquet file per published model version, holding the items whose vectors it changed
# (features/publish.py): a glob, which Feast's DuckDB offline store reads (a directory it does not),
# so materialize and point-in-time reads take each item's newest row across the versions
item_embeddings = FeatureView(
    name="item_embeddings", entities=[item], ttl=NO_EXPIRY,
    source=FileSource(name="item_embeddings_source", path=str(OFFLINE_DIR / "item_embeddings" / "*.parquet"),
                      timestamp_field="event_timestamp"),
    schema=[Field(name="attention_embedding", dtype=Array(Float32)),
            Field(name="representation_embedding", dtype=Array(Float32)),
            Field(name="model_version", dtype=String)],
    description="trained item embeddings with the model version that computed them, published after training "
                "and by the learner (only what changed)")

ranker_features = FeatureService(
    name="ranker", features=[*profiles, user_history, item_counters],
    description="what the unified-embedding + DARE ranker reads")
ranker_serving = FeatureService(
    name="ranker_serving", features=[*profiles, user_history, item_counters, item_embeddings],
    description="what the scoring service reads online, published embeddings included")
