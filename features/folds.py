"""What a batch of events does to one user's row and to one item's rows: pure functions.

The ingester (features/ingest.py) reads the rows of a batch's users and items from the online
store, folds each one's events into its row here, and writes the changed rows back. Nothing here
talks to Kafka or a store, so every rule of effectively-once ingestion is testable on plain
values (tests/test_folds.py):

- a user row keeps a watermark, the (topic incarnation/partition, offset) of the last event
  applied to it: a re-delivered event at or below it is skipped;
- a row keeps the 63-bit hashes of its last ``dedupe_window`` event ids (a user's with the
  event's label in the lowest bit): the same id again changes nothing; for a user, the same id
  with another label is dropped (an event id is immutable, its first delivery wins);
- a user's history is merged by time (stable: among equal times, arrival order) and cut to the
  store's history length;
- an item row keeps the highest offset applied per partition of the source topic, reset when
  the topic's incarnation changes (a recreated topic restarts at 0);
- item attributes are not counted but overwritten, in event-time order, never by an event older
  than the row (to the second: the online store keeps seconds).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from features.events import NOT_CARRIED


class Received(NamedTuple):
    """A valid event from the event topic, with what the store's schema makes of it."""
    partition: int
    offset: int
    event: Any  # UserEvent
    label: int
    behaviour: bool


class ItemDelta(NamedTuple):
    """An event re-keyed by item: where it came from, whether it counts, what it says about the item."""
    source: str  # the source topic's incarnation (features.ingest.topic_incarnation)
    partition: int  # of the source event
    offset: int
    event: Any  # UserEvent
    behaviour: bool
    attributes: dict  # item_profile columns as the store keeps them ({} when the event carries none)
    category: Any  # item_category text, or features.events.NOT_CARRIED


def event_key(event_id: str) -> int:
    """A 63-bit hash of an event id, as the recent-event windows keep it (8 bytes, not the id's
    length; two ids of one window collide with odds about window^2 / 2^64)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big") >> 1


def with_label(key: int, label: int) -> int:
    """An event id's key as a user's window keeps it: its lowest bit replaced by the event's label, so
    an id re-sent with another label is told from a retry (ids compare by ``key >> 1``: 62 bits)."""
    return (key & ~1) | (label & 1)


def unpack_window(packed: bytes | None) -> list[int]:
    """A row's recent event-id hashes (``recent_event_ids``: big-endian int64, oldest first)."""
    return np.frombuffer(packed or b"", dtype=">i8").tolist()


def remember(window: list[int], keys: list[int], size: int) -> bytes:
    """The window with ``keys`` added, the oldest beyond ``size`` dropped, packed for the row."""
    return np.asarray((window + keys)[-size:], dtype=">i8").tobytes()


def next_stamp_us(now_us: int, stored_us) -> int:
    """A row's next stamp: now, or just after the stored one when the clock is behind it (another
    host's clock, a clock step): Feast's Redis store silently drops a write stamped at or before
    the row's stamp."""
    return now_us if stored_us is None else max(now_us, int(stored_us) + 1)


# --- users ---

@dataclass(frozen=True)
class UserRow:
    """The ingester's columns of a ``user_history`` row (an absent row: the defaults)."""
    history_item_ids: list = field(default_factory=list)
    history_timestamps: list = field(default_factory=list)
    interaction_count: int = 0
    ingest_source: str | None = None  # "<topic incarnation>/<partition>" of the watermark
    ingest_offset: int = -1
    recent_event_ids: bytes | None = None


@dataclass
class UserFold:
    """What a user's events did: the new row (None: unchanged) and what was skipped or dropped."""
    row: UserRow | None = None
    applied: int = 0  # behaviours that entered the history
    skipped_duplicates: int = 0  # behaviours re-delivered or seen before
    duplicate_event_ids: int = 0  # of which: an id in the window (or earlier in the batch)
    conflicts: list = field(default_factory=list)  # (Received, first label): dropped, send no item delta


def fold_user(row: UserRow, events: list[Received], *, incarnation: str, history_length: int,
              dedupe_window: int, units_per_second: int) -> UserFold:
    """One user's events (any order; applied in offset order) into its row. History timestamps are
    in the schema's unit (``units_per_second``), like the loaded ones."""
    fold = UserFold()
    window = unpack_window(row.recent_event_ids)
    first_labels = {key >> 1: key & 1 for key in window}  # an id's first delivery's label
    fresh, keys, last = [], [], None
    for received in sorted(events, key=lambda r: r.offset):
        key = event_key(received.event.event_id)
        first_label = first_labels.get(key >> 1)
        if first_label is not None and first_label != received.label:
            # the first delivery wins, online as in the offline log (features/event_log.py keeps an id's
            # first logging)
            fold.conflicts.append((received, first_label))
            continue
        if f"{incarnation}/{received.partition}" == row.ingest_source and received.offset <= row.ingest_offset:
            fold.skipped_duplicates += received.behaviour  # re-delivered: applied before
            continue
        last = received
        if first_label is not None:  # the same id and label again: a producer's retry, a replay (its delta
            # is sent: the item side skips it by its own window)
            fold.skipped_duplicates += received.behaviour
            fold.duplicate_event_ids += received.behaviour
            continue
        first_labels[key >> 1] = received.label
        keys.append(with_label(key, received.label))
        fresh.append(received)
    if not fresh:
        return fold
    behaviours = [r for r in fresh if r.behaviour]
    fold.applied = len(behaviours)
    merged = list(zip(row.history_timestamps, row.history_item_ids))
    merged += [(r.event.event_time_ms * units_per_second // 1000, r.event.item_id) for r in behaviours]
    merged.sort(key=lambda pair: pair[0])  # stable: among equal times, arrival order
    merged = merged[-history_length:]
    fold.row = UserRow(history_item_ids=[item for _, item in merged], history_timestamps=[t for t, _ in merged],
                       interaction_count=row.interaction_count + len(behaviours),
                       ingest_source=f"{incarnation}/{last.partition}", ingest_offset=last.offset,
                       recent_event_ids=remember(window, keys, dedupe_window))
    return fold


# --- items ---

@dataclass(frozen=True)
class ItemCounterRow:
    """The ingester's columns of an ``item_counters`` row (an absent row: the defaults)."""
    interaction_count: int = 0
    ingest_topic: str | None = None  # the source topic's incarnation the marks are offsets of
    ingest_offsets: list = field(default_factory=list)  # per source partition, the highest applied (-1: none)
    recent_event_ids: bytes | None = None


def fold_item_counters(row: ItemCounterRow, deltas: list[ItemDelta], *,
                       dedupe_window: int) -> tuple[ItemCounterRow | None, int]:
    """One item's behaviour deltas into its counters: the new row (None: no delta was new) and how
    many deltas were skipped (re-delivered, or an event id seen before). A row whose watermarks
    moved is written even when every event id was a duplicate."""
    topic, marks = row.ingest_topic, list(row.ingest_offsets)
    unseen = []
    for delta in sorted(deltas, key=lambda d: (d.source != topic, d.partition, d.offset)):
        if delta.source != topic:
            # offsets of another incarnation say nothing about this one (it restarts at 0)
            topic, marks = delta.source, []
        marks += [-1] * (delta.partition + 1 - len(marks))
        if delta.offset > marks[delta.partition]:
            marks[delta.partition] = delta.offset
            unseen.append(delta)
    window = unpack_window(row.recent_event_ids)
    seen, fresh, keys = set(window), [], []
    for delta in unseen:
        key = event_key(delta.event.event_id)
        if key not in seen:
            seen.add(key)
            fresh.append(delta)
            keys.append(key)
    skipped = len(deltas) - len(fresh)
    if not unseen:
        return None, skipped
    return ItemCounterRow(interaction_count=row.interaction_count + len(fresh), ingest_topic=topic,
                          ingest_offsets=marks, recent_event_ids=remember(window, keys, dedupe_window)), skipped


def fold_item_attributes(row: dict, stored_seconds: int, deltas: list[ItemDelta]) -> tuple[dict, int] | None:
    """One item's attribute-carrying deltas over its ``item_profile`` row (a delta may carry some
    columns only), in event-time order (stable: arrival order); a delta older than the row's time
    (``stored_seconds``, 0: no row yet) is skipped. Returns the new row and its time (the latest
    applied event's, in ms), or None if every delta was older."""
    row, latest_ms = dict(row), None
    for delta in sorted(deltas, key=lambda d: d.event.event_time_ms):
        if delta.event.event_time_ms // 1000 < stored_seconds:
            continue  # the row holds a later event's attributes
        row.update(delta.attributes)
        if delta.category is not NOT_CARRIED:
            row["item_category"] = delta.category
        latest_ms = delta.event.event_time_ms
    return None if latest_ms is None else (row, latest_ms)
