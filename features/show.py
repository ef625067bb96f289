"""What the online store holds for one user or one item, as JSON: for debugging a pipeline.

    plexrec features show --user 42 [--data-dir D] [--profile redis --redis-url H:P]
    plexrec features show --item 7

A user: profile (the schema's users columns), history (items, timestamps, count), the
ingester's state (watermark, how many event ids its window holds, the row's stamp). An
item: profile, counters and the ingester's state, and the published embeddings' model
version and sizes. Each view says when its row was written (``written_at``), or
``null`` where the store holds no row: an id never loaded nor streamed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from features.schema import DatasetSchema

PROFILE_VIEW = {"user": "user_profile", "item": "item_profile"}


def entity_state(store, meta: dict, kind: str, entity_id: int) -> dict[str, Any]:
    """The JSON-ready state of the user or item ``entity_id`` (kind "user" or "item")."""
    schema = DatasetSchema.from_dict(meta["schema"], where="store.json schema")
    key = f"{kind}_id"
    state: dict[str, Any] = {key: entity_id, "schema": schema.name}
    group = schema.users if kind == "user" else schema.items
    profile_columns = [*group.columns, *(["item_category"] if kind == "item" else [])]
    if profile_columns:
        state["profile"] = _view(store, PROFILE_VIEW[kind], profile_columns, key, entity_id)
    if kind == "user":
        row = _view(store, "user_history", ["history_item_ids", "history_timestamps", "interaction_count",
                                            "ingest_source", "ingest_offset", "recent_event_ids", "stamp_us"],
                    key, entity_id)
        state["history"] = _stream_state(row, {"watermark": {"source": row.pop("ingest_source", None),
                                                             "offset": row.pop("ingest_offset", None)}})
        return state
    row = _view(store, "item_counters", ["interaction_count", "ingest_topic", "ingest_offsets", "recent_event_ids",
                                         "stamp_us"], key, entity_id)
    state["counters"] = _stream_state(row, {"watermarks": {"topic": row.pop("ingest_topic", None),
                                                           "offsets_by_partition": row.pop("ingest_offsets", None)}})
    embeddings = _view(store, "item_embeddings", ["attention_embedding", "representation_embedding",
                                                  "model_version"], key, entity_id)
    for name in ("attention_embedding", "representation_embedding"):
        vector = embeddings.pop(name, None)
        embeddings[f"{name}_dim"] = len(vector) if vector else None
    state["embeddings"] = embeddings
    return state


def _view(store, view: str, columns: list[str], key: str, entity_id: int) -> dict[str, Any]:
    table = store.get_online_features(features=[f"{view}:{c}" for c in columns],
                                      entity_rows=[{key: entity_id}]).to_dict(include_event_timestamps=True)
    row = {c: _plain(table[c][0]) for c in columns}
    stamps = [table[f"{c}__ts"][0] for c in columns if table.get(f"{c}__ts", [None])[0]]
    written = any(table[c][0] is not None for c in columns)
    row["written_at"] = (datetime.fromtimestamp(max(stamps), timezone.utc).isoformat()
                         if written and stamps else None)
    return row


def _stream_state(row: dict[str, Any], marks: dict[str, Any]) -> dict[str, Any]:
    window = row.pop("recent_event_ids", None)
    stamp_us = row.pop("stamp_us", None)
    row["ingester"] = {**marks, "event_ids_remembered": len(window or b"") // 8,
                       "stamp": datetime.fromtimestamp(stamp_us / 1e6, timezone.utc).isoformat()
                       if stamp_us is not None else None}
    return row


def _plain(value):
    """A value JSON can hold (numpy scalars and arrays from some stores become Python ones)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
