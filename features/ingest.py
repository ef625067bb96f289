"""The stream ingester: Kafka user events -> fresh online features and an offline event log.

    plexrec ingest --bootstrap-servers HOST:PORT [--topic user-events] [--group plexrec-ingest]
                   [--security-protocol SASL_SSL --sasl-mechanism ... (features/kafka_options.py)]
                   [--metrics-port 9465]

One loop, a batch at a time:

  1. poll a batch of messages (a consumer group: run more ingesters to scale out)
  2. decode and validate each, also against the store's schema (store.json, read at
     start: the event's label, its numeric context values, its item attributes; see
     features/events.py); a bad one goes to ``<topic>.dead-letter`` with its reason,
     partition and offset in the headers, and is counted
  3. group the behaviours by user (Kafka key = user id, so one partition owns a user),
     read those users' rows from the online store, apply the events, write the changed
     rows back in one batch. What is a behaviour is the schema's history rule, as the
     loader applies it to rows: every event (history: all) or those labelled 1 (history:
     positive). History timestamps are in the schema's unit, like the loaded ones
  4. append the events to the offline event log (Parquet, one file per batch, on disk before
     the commit; every row stamped with the store's schema fingerprint, features/log_stamp.py;
     compacted into training data by features/event_log.py)
  5. re-key every behaviour, and every event that carries item attributes, onto
     ``<topic>.item-deltas`` with the item id as key, so that one partition owns an item
     too; the same consumer reads that topic, applies behaviours to the item counters
     exactly as user events to users, and writes the item_profile row of an item whose
     attributes a delta carries (over the row's other values; the latest event time wins)
  6. only then commit the offsets (of both topics, once the deltas are acknowledged)

Effectively-once effect, by offset and by event id. A crash anywhere before step 6
re-delivers the batch. Every user row carries a watermark, the (topic incarnation/partition,
offset) of the last event applied to it, and every item row the last offset applied per
partition of the source topic (carried by each delta in its headers); a re-delivered event or
delta at or below its watermark is skipped. The same event published twice (a producer's
retry, a replay run twice) arrives at a new offset: every row also keeps the 63-bit hashes of
the event ids of its last ``--dedupe-window`` (1,000) behaviours, and an id among them (or
earlier in the batch) changes nothing, for the user and for the item alike. Item rows are
written only by the owner of the item's delta partition, so ingesters in a group never
read-modify-write one row at once. So a user's history and every count change once per event
id, however often the event is sent and however many ingesters die.

An event id is immutable: its first delivery wins, online as in the offline log (whose
readers keep an id's first logging, features/event_log.py). Every valid event, behaviour or
not, enters its user's window with its label (the key's lowest bit), so an id first delivered
as an unclicked impression and then re-sent as a click is dropped (no behaviour, no delta),
counted (``conflicting_event_ids``) and logged at WARNING once per batch. The limits: the window
is bounded (an id older than its user's last ``--dedupe-window`` events is not recognised), and
an id re-sent under another user is another partition's (the offline log keeps its first
logging; online both count). Item attributes are not
counted but overwritten: a re-delivered delta writes the same values again, and one whose
event is older than the row's (to the second: the online store keeps seconds) is skipped.
The offline log is at-least-once: a re-delivered batch is logged again, and readers drop
duplicate event ids (over the whole log; online, over the window). A produce that is not
acknowledged stops the ingester before the commit (IngestError).

A topic deleted and recreated under its name restarts its offsets at 0: the watermarks name
the topic's incarnation, ``topic@<topic id>`` (Kafka's topic id), which the ingester checks at
start, when offsets go backwards, each idle second and every 30 s; a new one makes it read
the topic from its beginning. Rows are stamped with the ingester's clock but always after
their previous stamp (kept in the row, in microseconds): Feast's Redis store drops a write
stamped at or before the row's, which a clock behind another host's would otherwise do.

The limit: there is no fencing token. An ingester that stalls past the session timeout or
max_poll_interval loses its partitions but does not know it until its next poll, and a
write it makes meanwhile can overwrite the new owner's. Keep batches short, and let a
supervisor restart stalled ingesters.

No torch: Feast imports torch when it can, so the ingester hides it first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from features.durable import durably_replace
from features.errors import ConfigError
from features.events import (DEAD_LETTER_SUFFIX, InvalidEvent, check_against_schema, decode_event, is_behaviour,
                             item_category_of, stored_item_attributes, unknown_context_keys)
from features.folds import (ItemCounterRow, ItemDelta, Received, UserRow, fold_item_attributes, fold_item_counters,
                            fold_user, next_stamp_us)
from features.ingest_metrics import IngestMetrics
from features.kafka_options import (KafkaOptionsError, add_kafka_arguments, kafka_options, replication_factor,
                                    unreachable)
from features.store import STORE_LAYOUT, StoreError, data_dir, open_store, read_store_meta, stored_schema

log = logging.getLogger("plexrec.ingest")


def without_torch() -> None:
    """Make ``import torch`` fail in this process, so Feast does not load it (feast.torch_wrapper
    imports torch eagerly and copes when it cannot)."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]


class IngestError(RuntimeError):
    """The ingester cannot go on safely (its uncommitted batch is re-delivered on restart), or cannot
    start with the options given; the message says what to do."""


@dataclass
class IngestStats:
    batches: int = 0
    events: int = 0
    applied: int = 0  # behaviours applied to user histories
    item_deltas: int = 0
    skipped_duplicates: int = 0  # behaviours re-delivered (at or below the user's watermark) or seen before
    duplicate_event_ids: int = 0  # of which: an event id in the user's recent window
    conflicting_event_ids: int = 0  # events whose id was first delivered with another label: dropped
    skipped_item_duplicates: int = 0  # the same two rules on the item side
    dead_letters: int = 0
    failed_commits: int = 0
    not_behaviours: int = 0  # valid events the history rule keeps out (e.g. unclicked impressions)
    item_profiles: int = 0  # item_profile rows written from item attributes
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


USER_ROW_COLUMNS = [f.name for f in fields(UserRow)]  # the user_history columns the folds read and write
ITEM_COUNTER_COLUMNS = [f.name for f in fields(ItemCounterRow)]
ITEM_DELTAS_SUFFIX = ".item-deltas"
DEFAULT_PARTITIONS = 4
MAX_REPORTED_CONTEXT_KEYS = 1000  # free-form context keys are logged once each, up to this many
# event ids remembered per user (every event) and per item (behaviours): a producer's retry or a
# second replay arrives well within this many of the entity's later events
DEDUPE_WINDOW = 1000
# how often the ingester asks the broker whether its topic was recreated: while idle, and anyway
IDLE_INCARNATION_CHECK_SECONDS, INCARNATION_CHECK_SECONDS = 1.0, 30.0


def ensure_topics(kafka: dict, topic: str, partitions: int = DEFAULT_PARTITIONS,
                  replication_factor: int = 1) -> int:
    """Create the event topic (if missing) and its item-delta topic with as many partitions;
    returns that number. ``kafka``: kafka-python connection options (features/kafka_options.py).
    A topic another ingester just created is fine."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    probe = KafkaConsumer(**kafka)
    try:
        existing = probe.partitions_for_topic(topic)
    finally:
        probe.close()
    count = len(existing) if existing else partitions
    admin = KafkaAdminClient(**kafka)
    try:
        for name in ([] if existing else [topic]) + [topic + ITEM_DELTAS_SUFFIX]:
            try:
                admin.create_topics([NewTopic(name, num_partitions=count, replication_factor=replication_factor)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return count


def topic_incarnation(admin, topic: str) -> str | None:
    """``topic@<topic id>``: a topic deleted and recreated under the same name is another
    incarnation, whose offsets start again at 0. Just ``topic`` where the broker reports no
    topic ids (Kafka before 2.8): recreated topics then go unnoticed (logged). None while the
    topic does not exist (deleted, not yet recreated)."""
    from kafka.errors import KafkaError

    try:
        (description,) = admin.describe_topics([topic])
    except KafkaError:
        return None
    if description.get("error_code"):
        return None
    topic_id = str(description.get("topic_id") or "")
    if not topic_id or set(topic_id) <= {"0", "-"}:
        log.warning("the broker reports no topic id for %s: a recreated topic would be taken for the old one "
                    "(its events skipped up to the old offsets)", topic)
        return topic
    return f"{topic}@{topic_id}"


def source_position(message, incarnation: str) -> tuple[str, int, int]:
    """The (topic incarnation, partition, offset) of the event an item delta was re-keyed from.
    Deltas sent before the source_topic header existed came from the current incarnation."""
    headers = dict(message.headers or [])
    try:
        source = headers["source_topic"].decode() if "source_topic" in headers else incarnation
        return source, int(headers["source_partition"]), int(headers["source_offset"])
    except (KeyError, ValueError, UnicodeDecodeError):
        raise InvalidEvent("item delta without source_partition/source_offset headers") from None


def delta_is_behaviour(message) -> bool:
    """Whether an item delta counts. Deltas sent before the header existed were all behaviours."""
    return dict(message.headers or []).get("behaviour", b"1") == b"1"


def history_length_of(meta: dict, requested: int | None) -> int:
    """The history length to keep: the store's (store.json ``history_length``), which training, the
    learner and serving read too. ``requested`` (``--history-length``) may only repeat it: an
    ingester keeping fewer behaviours would have serving score shorter histories than the model
    was trained on (and serving accepts any model reading at most the store's length)."""
    stored = int(meta["history_length"])
    if requested is None or requested == stored:
        return stored
    raise IngestError(f"--history-length {requested} differs from the store's {stored} (store.json history_length), "
                      f"which training, the learner and serving read: one store keeps one length. Drop the "
                      f"flag (the store's is the default), or reload the store with `plexrec features load "
                      f"--history-length {requested}` and retrain")


class Ingester:
    def __init__(self, bootstrap_servers: str, store, directory: Path, *, topic: str = "user-events",
                 group: str = "plexrec-ingest", history_length: int | None = None, max_batch: int = 2000,
                 poll_timeout_ms: int = 500, partitions: int = DEFAULT_PARTITIONS, kafka: dict | None = None,
                 replication_factor: int = 1, dedupe_window: int = DEDUPE_WINDOW, clock=time.time) -> None:
        """``history_length``: None or the store's (IngestError otherwise). ``kafka``: more kafka-python connection options
        (security; features/kafka_options.py). ``clock``: seconds since the epoch, for the rows'
        stamps. Raises StoreError without a loaded store (store.json)."""
        # the store decides what an event means: its schema (labels, history rule, timestamp unit,
        # item attributes) and its column types; read before connecting, so a bad start fails fast
        meta = read_store_meta(directory)
        if not meta.get("schema") or "history_length" not in meta:
            raise StoreError(f"{directory}/store.json holds no schema: it was written by an older plexrec; reload "
                             "the store (`plexrec features load --schema ...`)")
        if meta.get("layout", 1) < STORE_LAYOUT:
            raise StoreError(f"{directory} was loaded by an older plexrec, without the event-id windows the "
                             "ingester keeps; reload the store (`plexrec features load --schema ...`)")
        if dedupe_window < 1:
            raise IngestError(f"--dedupe-window {dedupe_window}: remember at least 1 event id per user and item")
        self.schema, self.types = stored_schema(directory), dict(meta["types"])
        # stamped on every logged row (features/log_stamp.py): a log left behind by a store of another
        # schema can be told apart after the directory is loaded again
        self.schema_fingerprint = str(meta.get("schema_fingerprint") or self.schema.fingerprint())
        self.history_length = history_length_of(meta, history_length)
        self.item_profile_columns = [*self.schema.items.columns, "item_category"]

        from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

        self.store, self.directory, self.topic = store, directory, topic
        self.dead_letter_topic = topic + DEAD_LETTER_SUFFIX
        self.item_deltas_topic = topic + ITEM_DELTAS_SUFFIX
        self.max_batch, self.poll_timeout_ms = max_batch, poll_timeout_ms
        self.dedupe_window, self.clock = dedupe_window, clock
        self.kafka = {**(kafka or {}), "bootstrap_servers": bootstrap_servers}
        ensure_topics(self.kafka, topic, partitions, replication_factor)
        # the watermarks name the topic's incarnation, so a recreated topic's offsets are new
        self.admin = KafkaAdminClient(**self.kafka)
        self.incarnation = topic_incarnation(self.admin, topic) or topic
        self.incarnation_checked = time.monotonic()
        self.highest_offsets: dict[int, int] = {}  # per partition of the event topic, this process
        # a short session timeout: the first group assignment waits about half of it (measured on tansu)
        self.consumer = KafkaConsumer(
            topic, self.item_deltas_topic, **self.kafka, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
            heartbeat_interval_ms=1000, max_poll_interval_ms=60000, max_poll_records=max_batch)
        # one request in flight: a partition's deltas reach the broker in the order they were sent,
        # which the item watermarks rely on
        self.producer = KafkaProducer(**self.kafka, acks="all", linger_ms=5, max_in_flight_requests_per_connection=1)

        self.stats, self.metrics = IngestStats(), IngestMetrics()
        self.commit_seconds: list[float] = []  # since the metrics last followed the stats
        self.sent: list = []  # this batch's produce futures
        self.reported_context_keys: set[str] = set()
        self.log_dir = directory / "offline" / "events"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # --- one batch ---

    def run_once(self) -> int:
        """Poll, apply and commit one batch; returns how many messages it held."""
        from kafka.errors import CommitFailedError

        polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_batch)
        messages = [m for records in polled.values() for m in records]
        since_check = time.monotonic() - self.incarnation_checked
        if (self._offsets_went_back(messages) or since_check > INCARNATION_CHECK_SECONDS or
                (not messages and since_check > IDLE_INCARNATION_CHECK_SECONDS)) and self._topic_was_recreated():
            # read the new topic from its start, in order: the watermarks assume order per partition
            messages = [m for m in messages if m.topic != self.topic]
        if not messages:
            return 0
        events, deltas = [], []
        self.sent = []
        for message in messages:
            try:
                if message.topic == self.item_deltas_topic:
                    deltas.append(self._item_delta(message))
                else:
                    events.append(self._received(message))
            except InvalidEvent as reason:
                self._dead_letter(message, str(reason))
        if events:
            dropped = self._apply_to_users(events)
            self._log(events)
            self._send_item_deltas(events, dropped)
        if deltas:
            self._apply_to_items(deltas)
            self._apply_item_attributes(deltas)
        self.producer.flush()  # dead letters and deltas are safe before their offsets are committed
        failed = [f for f in self.sent if f.failed()]
        if failed:  # flush() waits but does not raise: without this the commit would lose them
            raise IngestError(f"{len(failed)} of {len(self.sent)} dead letters / item deltas were not acknowledged "
                              f"({failed[0].exception!r}); offsets not committed, the batch will be re-delivered")
        started = time.perf_counter()
        try:
            self.consumer.commit()
            self.commit_seconds.append(time.perf_counter() - started)
        except CommitFailedError:
            # the group rebalanced mid-batch: the new owner gets these messages again and the
            # watermarks make it skip what this batch already applied
            self.stats.failed_commits += 1
            log.warning("offsets not committed: the group rebalanced; the batch will be re-delivered")
        self.stats.batches += 1
        from_deltas = sum(m.topic == self.item_deltas_topic for m in messages)
        self.stats.events += len(messages) - from_deltas
        self.stats.item_deltas += from_deltas
        self.metrics.follow(self.stats, self.commit_seconds, self._lags())
        self.commit_seconds = []
        return len(messages)

    def _lags(self) -> dict[tuple[str, int], int]:
        """Per assigned partition, the broker's high watermark minus this consumer's position."""
        lags = {}
        for partition in self.consumer.assignment():
            highwater = self.consumer.highwater(partition)
            if highwater is not None:
                lags[partition.topic, partition.partition] = max(0, highwater - self.consumer.position(partition))
        return lags

    def _offsets_went_back(self, messages) -> bool:
        """Offsets going backwards mean a re-delivery (a rebalance, a failed commit) or a recreated
        topic (the consumer's position was out of its range); only the topic id tells them apart."""
        went_back = False
        for message in messages:
            if message.topic == self.topic:
                highest = self.highest_offsets.get(message.partition, -1)
                went_back |= message.offset < highest
                self.highest_offsets[message.partition] = max(highest, message.offset)
        return went_back

    def _topic_was_recreated(self) -> bool:
        """Ask the broker for the topic's id. A new one: the topic was recreated and its offsets start
        again at 0, below this consumer's position if the new topic is no longer than the old one:
        seek to its beginning (events seen under the old incarnation are skipped by their ids)."""
        self.incarnation_checked = time.monotonic()
        incarnation = topic_incarnation(self.admin, self.topic)
        if incarnation is None or incarnation == self.incarnation:  # None: deleted, not yet recreated
            return False
        log.warning("topic %s was deleted and recreated (now %s): its offsets start again, its events are new; "
                    "reading it from the beginning", self.topic, incarnation)
        self.incarnation, self.highest_offsets = incarnation, {}
        mine = [p for p in self.consumer.assignment() if p.topic == self.topic]
        if mine:
            self.consumer.seek_to_beginning(*mine)
        return True

    def _received(self, message) -> Received:
        """A message of the event topic, judged against the store's schema (InvalidEvent if it does not fit)."""
        event = decode_event(message.key, message.value)
        label = check_against_schema(event, self.schema, self.types)
        behaviour = is_behaviour(label, self.schema)
        self.stats.not_behaviours += not behaviour
        for key in unknown_context_keys(event, self.schema):
            if key not in self.reported_context_keys and len(self.reported_context_keys) < MAX_REPORTED_CONTEXT_KEYS:
                self.reported_context_keys.add(key)
                log.info("context key %r is not a context column of schema '%s': kept in the event log only",
                         key, self.schema.name)
        return Received(message.partition, message.offset, event, label, behaviour)

    def _item_delta(self, message) -> ItemDelta:
        source, partition, offset = source_position(message, self.incarnation)
        event = decode_event(None, message.value)
        # checked when the event arrived; converted again here, where the row is written (InvalidEvent
        # if the store was reloaded with another schema since)
        attributes = stored_item_attributes(event, self.schema, self.types) if event.item_attributes else {}
        return ItemDelta(source, partition, offset, event, delta_is_behaviour(message), attributes,
                         item_category_of(event, self.schema))

    def _dead_letter(self, message, reason: str) -> None:
        headers = [("reason", reason.encode()), ("source_topic", message.topic.encode()),
                   ("source_partition", str(message.partition).encode()),
                   ("source_offset", str(message.offset).encode())]
        self.sent.append(self.producer.send(self.dead_letter_topic, key=message.key, value=message.value,
                                            headers=headers))
        self.stats.dead_letters += 1
        self.stats.reasons[reason.split(":")[0].split(" ")[0]] += 1
        log.warning("dead letter (partition %d offset %d): %s", message.partition, message.offset, reason)

    def _apply_to_users(self, events: list[Received]) -> set[tuple[int, int]]:
        """Fold each user's events into its row (features/folds.py), in one read and one write of the
        store. Returns the (partition, offset) of the events whose id was first delivered with
        another label: dropped, their item deltas are not sent."""
        import pandas as pd

        by_user: dict[int, list[Received]] = defaultdict(list)
        for received in events:
            by_user[received.event.user_id].append(received)
        now_us = int(self.clock() * 1_000_000)
        users = list(by_user)
        current = self.store.get_online_features(
            features=[f"user_history:{c}" for c in (*USER_ROW_COLUMNS, "stamp_us")],
            entity_rows=[{"user_id": u} for u in users]).to_dict()
        rows, conflicts = [], []
        for i, user in enumerate(users):
            stored = {c: current[c][i] for c in USER_ROW_COLUMNS if current[c][i] is not None}
            fold = fold_user(UserRow(**stored), by_user[user], incarnation=self.incarnation,
                             history_length=self.history_length, dedupe_window=self.dedupe_window,
                             units_per_second=self.schema.units_per_second)
            self.stats.applied += fold.applied
            self.stats.skipped_duplicates += fold.skipped_duplicates
            self.stats.duplicate_event_ids += fold.duplicate_event_ids
            conflicts += fold.conflicts
            if fold.row is not None:
                stamp = next_stamp_us(now_us, current["stamp_us"][i])
                rows.append({"user_id": user, **asdict(fold.row), "stamp_us": stamp,
                             "event_timestamp": pd.Timestamp(stamp, unit="us", tz="UTC")})
        if rows:
            self.store.write_to_online_store("user_history", pd.DataFrame(rows))
        if conflicts:
            self.stats.conflicting_event_ids += len(conflicts)
            received, first_label = conflicts[0]
            log.warning("%d events came with an event id first delivered with another label, and were dropped (an "
                        "event id is immutable: its first delivery wins, online and in the offline log); e.g. "
                        "event id %r of user %d (partition %d offset %d): label %d, first delivered with label %d",
                        len(conflicts), received.event.event_id, received.event.user_id, received.partition,
                        received.offset, received.label, first_label)
        return {(received.partition, received.offset) for received, _ in conflicts}

    def _send_item_deltas(self, events: list[Received], dropped: set[tuple[int, int]]) -> None:
        """Every behaviour and every event with item attributes, re-delivered ones included (the item
        side has its own watermarks and window), in offset order per partition, keyed by item id; not
        those the user side ``dropped`` (an id first delivered with another label)."""
        for received in sorted(events, key=lambda r: (r.partition, r.offset)):
            if (received.partition, received.offset) in dropped:
                continue
            if received.behaviour or received.event.item_attributes:
                headers = [("source_topic", self.incarnation.encode()),
                           ("source_partition", str(received.partition).encode()),
                           ("source_offset", str(received.offset).encode()),
                           ("behaviour", b"1" if received.behaviour else b"0")]
                self.sent.append(self.producer.send(
                    self.item_deltas_topic, key=str(received.event.item_id).encode(),
                    value=received.event.SerializeToString(), headers=headers))

    def _apply_to_items(self, deltas: list[ItemDelta]) -> None:
        """The behaviours among the deltas, counted once each (features/folds.py); this ingester owns
        these items."""
        import pandas as pd

        by_item: dict[int, list[ItemDelta]] = defaultdict(list)
        for delta in deltas:
            if delta.behaviour:  # a delta sent only for its item attributes does not count
                by_item[delta.event.item_id].append(delta)
        if not by_item:
            return
        now_us = int(self.clock() * 1_000_000)
        items = list(by_item)
        current = self.store.get_online_features(
            features=[f"item_counters:{c}" for c in (*ITEM_COUNTER_COLUMNS, "stamp_us")],
            entity_rows=[{"item_id": i} for i in items]).to_dict()
        rows = []
        for i, item in enumerate(items):
            stored = {c: current[c][i] for c in ITEM_COUNTER_COLUMNS if current[c][i] is not None}
            row, skipped = fold_item_counters(ItemCounterRow(**stored), by_item[item],
                                              dedupe_window=self.dedupe_window)
            self.stats.skipped_item_duplicates += skipped
            if row is not None:
                stamp = next_stamp_us(now_us, current["stamp_us"][i])
                rows.append({"item_id": item, **asdict(row), "stamp_us": stamp,
                             "event_timestamp": pd.Timestamp(stamp, unit="us", tz="UTC")})
        if rows:
            self.store.write_to_online_store("item_counters", pd.DataFrame(rows))

    def _apply_item_attributes(self, deltas: list[ItemDelta]) -> None:
        """item_profile rows from the deltas' item attributes (features/folds.py); each row is stamped
        with its latest event's time, so an older event arriving later changes nothing."""
        import pandas as pd

        by_item: dict[int, list[ItemDelta]] = defaultdict(list)
        for delta in deltas:
            if delta.event.item_attributes:
                by_item[delta.event.item_id].append(delta)
        if not by_item:
            return
        items = list(by_item)
        current = self.store.get_online_features(
            features=[f"item_profile:{c}" for c in self.item_profile_columns],
            entity_rows=[{"item_id": i} for i in items]).to_dict(include_event_timestamps=True)
        rows = []
        for i, item in enumerate(items):
            stored = {c: current[c][i] for c in self.item_profile_columns}
            folded = fold_item_attributes(stored, current["item_category__ts"][i] or 0, by_item[item])
            if folded is not None:
                row, latest_ms = folded
                rows.append({"item_id": item, **row, "event_timestamp": pd.Timestamp(latest_ms, unit="ms", tz="UTC")})
        if rows:
            frame = pd.DataFrame(rows, dtype=object)  # object: a missing Int64 / Float32 value stays None
            frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
            self.store.write_to_online_store("item_profile", frame)
            self.stats.item_profiles += len(rows)

    def _log(self, events: list[Received]) -> None:
        """Append the batch to the offline event log (at-least-once; dedupe by event_id), durably."""
        import json

        import pandas as pd

        frame = pd.DataFrame({
            "event_id": [r.event.event_id for r in events],
            "user_id": [r.event.user_id for r in events],
            "item_id": [r.event.item_id for r in events],
            "event_type": [int(r.event.event_type) for r in events],
            "event_timestamp": pd.to_datetime([r.event.event_time_ms for r in events], unit="ms", utc=True),
            "value": [r.event.value if r.event.HasField("value") else None for r in events],
            "label": [r.label for r in events],  # as the store's schema labelled it
            "context": [json.dumps(dict(r.event.context), sort_keys=True) for r in events],
            "item_attributes": [json.dumps(dict(r.event.item_attributes), sort_keys=True) for r in events],
            "source": self.incarnation,  # the topic's incarnation: its partitions' offsets start at 0 again
            "partition": [r.partition for r in events],
            "offset": [r.offset for r in events],
            "schema_fingerprint": self.schema_fingerprint,  # of the store it was ingested into
        })
        first = min((r.partition, r.offset) for r in events)
        path = self.log_dir / f"batch-{time.time_ns()}-p{first[0]}-o{first[1]}.parquet"
        staging = path.with_suffix(".parquet.tmp")  # a kill mid-write leaves only a .tmp behind
        # (again: a `features load` of another schema moves the log directory aside; what this ingester
        # logs after it carries the old schema's stamp, so compaction refuses it)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(staging, index=False)
        # on disk (the file, then its name in the directory) before the offsets are committed: a power
        # loss after the commit must not lose a batch that Kafka will not deliver again
        durably_replace(staging, path)

    # --- the loop ---

    def run(self, stop_after_idle_seconds: float | None = None, progress_seconds: float = 30.0) -> IngestStats:
        """Ingest until stopped, or until idle that long once partitions are assigned; a progress
        line every ``progress_seconds`` in which something happened."""
        idle_since = last_report = time.monotonic()
        reported = (0, 0, 0, 0, 0)
        while True:
            if self.run_once() or not self.consumer.assignment():  # joining the group is not idleness
                idle_since = time.monotonic()
            elif stop_after_idle_seconds is not None and time.monotonic() - idle_since > stop_after_idle_seconds:
                return self.stats
            if time.monotonic() - last_report >= progress_seconds:
                now = (self.stats.events, self.stats.applied, self.stats.skipped_duplicates,
                       self.stats.dead_letters, self.stats.item_deltas)
                if now != reported:
                    delta = [a - b for a, b in zip(now, reported)]
                    log.info("last %.0f s: %d events (%.0f/s), %d applied, %d duplicates skipped, %d dead letters, "
                             "%d item deltas; partitions %s", time.monotonic() - last_report, delta[0],
                             delta[0] / (time.monotonic() - last_report), *delta[1:],
                             sorted(f"{tp.topic}/{tp.partition}" for tp in self.consumer.assignment()))
                reported, last_report = now, time.monotonic()

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()
        self.consumer.close()
        self.admin.close()


def main(argv: list[str] | None = None) -> None:
    without_torch()

    parser = argparse.ArgumentParser(prog="plexrec ingest", description=__doc__.splitlines()[0])
    add_kafka_arguments(parser)
    parser.add_argument("--topic", default="user-events")
    parser.add_argument("--group", default="plexrec-ingest", help="consumer group (run several to scale out)")
    parser.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    parser.add_argument("--profile", default="local", choices=["local", "redis"])
    parser.add_argument("--redis-url", help="host:port of Redis for --profile redis")
    parser.add_argument("--history-length", type=int,
                        help="behaviours kept per user: the store's (store.json, the default); any other value "
                             "is refused (reload the store with `plexrec features load --history-length N`)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help="partitions of the topics the ingester creates when they are missing")
    parser.add_argument("--dedupe-window", type=int, default=DEDUPE_WINDOW,
                        help=f"event ids remembered per user (of every event) and per item (of behaviours): an "
                             f"id seen again among them changes nothing (default: {DEDUPE_WINDOW})")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    parser.add_argument("--stop-after-idle", type=float, help="exit after this many idle seconds (default: never)")
    parser.add_argument("--progress-seconds", type=float, default=30.0, help="log progress this often")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        directory = data_dir(args.data_dir)
        kafka = kafka_options(args)
        ingester = Ingester(kafka.pop("bootstrap_servers"), open_store(args.profile, directory, args.redis_url),
                            directory, topic=args.topic, group=args.group, history_length=args.history_length,
                            partitions=args.partitions, kafka=kafka, replication_factor=replication_factor(args),
                            dedupe_window=args.dedupe_window)
    except (StoreError, IngestError, ConfigError, KafkaOptionsError) as exc:
        sys.exit(f"plexrec ingest: {exc}")
    except Exception as exc:
        message = unreachable("plexrec ingest", args, exc)
        if message is None:
            raise
        sys.exit(message)
    if args.metrics_port is not None:
        port = ingester.metrics.serve(args.metrics_host, args.metrics_port)
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, port)
    log.info("ingesting %s from %s into %s (group %s; schema '%s', history: %s, %d behaviours per user)", args.topic,
             args.bootstrap_servers, directory, args.group, ingester.schema.name, ingester.schema.history,
             ingester.history_length)
    failure = None
    try:
        stats = ingester.run(args.stop_after_idle, args.progress_seconds)
    except KeyboardInterrupt:
        stats = ingester.stats
    except IngestError as exc:
        stats, failure = ingester.stats, exc
    finally:
        ingester.close()
        ingester.metrics.close()
    if failure is not None:
        sys.exit(f"plexrec ingest: {failure}; restart it (a supervisor should)")
    log.info("stopped: %d batches, %d events, %d applied, %d duplicates skipped (%d by event id), %d dead letters, "
             "%d item deltas (%d duplicates skipped), %d not behaviours, %d item profiles written, %d events dropped "
             "for an id first delivered with another label", stats.batches, stats.events, stats.applied,
             stats.skipped_duplicates, stats.duplicate_event_ids, stats.dead_letters, stats.item_deltas,
             stats.skipped_item_duplicates, stats.not_behaviours, stats.item_profiles, stats.conflicting_event_ids)


if __name__ == "__main__":
    main()
