"""The stream ingester: Kafka user events -> fresh online features and an offline event log.

    plexrec ingest --bootstrap-servers HOST:PORT [--topic user-events] [--group plexrec-ingest]

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
  4. append the events to the offline event log (Parquet, one file per batch)
  5. re-key every behaviour, and every event that carries item attributes, onto
     ``<topic>.item-deltas`` with the item id as key, so that one partition owns an item
     too; the same consumer reads that topic, applies behaviours to the item counters
     exactly as user events to users, and writes the item_profile row of an item whose
     attributes a delta carries (over the row's other values; the latest event time wins)
  6. only then commit the offsets (of both topics, once the deltas are acknowledged)

Exactly-once effect. A crash anywhere before step 6 re-delivers the batch. Every
user row carries a watermark, the (topic/partition, offset) of the last event applied
to it, and every item row the last offset applied per partition of the source topic
(carried by each delta in its headers); a re-delivered event or delta at or below its
watermark is skipped. Item rows are written only by the owner of the item's delta
partition, so ingesters in a group never read-modify-write one row at once. So a
user's history and every count change exactly once per event, however often and
however many ingesters die. Item attributes are not counted but overwritten: a
re-delivered delta writes the same values again, and one whose event is older than the
row's (to the second: the online store keeps seconds) is skipped. The offline log
is at-least-once: a re-delivered batch is logged again, and readers drop duplicate
event ids. A produce that is not acknowledged stops the ingester before the commit
(IngestError).

The limit: there is no fencing token. An ingester that stalls past the session timeout
or max_poll_interval loses its partitions but does not know it until its next poll, and
a write it makes meanwhile can overwrite the new owner's. Keep batches short, and let a
supervisor restart stalled ingesters.

No torch: Feast imports torch when it can, so the ingester hides it first.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

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
    skipped_duplicates: int = 0
    dead_letters: int = 0
    failed_commits: int = 0
    not_behaviours: int = 0  # valid events the history rule keeps out (e.g. unclicked impressions)
    item_profiles: int = 0  # item_profile rows written from item attributes
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Received(NamedTuple):
    """A valid event from the event topic, with what the store's schema makes of it."""
    partition: int
    offset: int
    event: Any  # UserEvent
    label: int
    behaviour: bool


class ItemDelta(NamedTuple):
    """An event re-keyed by item: where it came from, whether it counts, what it says about the item."""
    partition: int  # of the source event
    offset: int
    event: Any  # UserEvent
    behaviour: bool
    attributes: dict  # item_profile columns as the store keeps them ({} when the event carries none)
    category: Any  # item_category text, or features.events.NOT_CARRIED


ITEM_DELTAS_SUFFIX = ".item-deltas"
DEFAULT_PARTITIONS = 4
MAX_REPORTED_CONTEXT_KEYS = 1000  # free-form context keys are logged once each, up to this many


def ensure_topics(bootstrap_servers: str, topic: str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """Create the event topic (if missing) and its item-delta topic with as many partitions;
    returns that number. Works on any Kafka cluster; a topic another ingester just created is fine."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    probe = KafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        existing = probe.partitions_for_topic(topic)
    finally:
        probe.close()
    count = len(existing) if existing else partitions
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        for name in ([] if existing else [topic]) + [topic + ITEM_DELTAS_SUFFIX]:
            try:
                admin.create_topics([NewTopic(name, num_partitions=count, replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return count


def source_position(message) -> tuple[int, int]:
    """The (partition, offset) of the event an item delta was re-keyed from."""
    from features.events import InvalidEvent

    headers = dict(message.headers or [])
    try:
        return int(headers["source_partition"]), int(headers["source_offset"])
    except (KeyError, ValueError):
        raise InvalidEvent("item delta without source_partition/source_offset headers") from None


def delta_is_behaviour(message) -> bool:
    """Whether an item delta counts. Deltas sent before the header existed were all behaviours."""
    return dict(message.headers or []).get("behaviour", b"1") == b"1"


def history_length_of(meta: dict, requested: int | None) -> int:
    """The history length to keep: the store's (store.json), or a shorter one asked for."""
    stored = int(meta["history_length"])
    if requested is None:
        return stored
    if requested < 1:
        raise IngestError(f"--history-length {requested}: keep at least 1 behaviour per user")
    if requested > stored:
        raise IngestError(f"--history-length {requested} is longer than the store's {stored} (store.json): the "
                          f"loaded histories, the model and the server hold at most {stored}. Pass at most "
                          f"{stored}, or reload the store with `plexrec features load --history-length {requested}`")
    return requested


class Ingester:
    def __init__(self, bootstrap_servers: str, store, directory: Path, *, topic: str = "user-events",
                 group: str = "plexrec-ingest", history_length: int | None = None, max_batch: int = 2000,
                 poll_timeout_ms: int = 500, partitions: int = DEFAULT_PARTITIONS) -> None:
        """``history_length`` None: the store's. Raises StoreError without a loaded store (store.json)."""
        from features.events import DEAD_LETTER_SUFFIX
        from features.store import StoreError, read_store_meta, stored_schema

        # the store decides what an event means: its schema (labels, history rule, timestamp unit,
        # item attributes) and its column types; read before connecting, so a bad start fails fast
        meta = read_store_meta(directory)
        if not meta.get("schema") or "history_length" not in meta:
            raise StoreError(f"{directory}/store.json holds no schema: it was written by an older plexrec; reload "
                             "the store (`plexrec features load --schema ...`)")
        self.schema, self.types = stored_schema(directory), dict(meta["types"])
        self.history_length = history_length_of(meta, history_length)
        self.item_profile_columns = [*self.schema.items.columns, "item_category"]

        from kafka import KafkaConsumer, KafkaProducer

        self.store, self.directory, self.topic = store, directory, topic
        self.dead_letter_topic = topic + DEAD_LETTER_SUFFIX
        self.item_deltas_topic = topic + ITEM_DELTAS_SUFFIX
        self.max_batch, self.poll_timeout_ms = max_batch, poll_timeout_ms
        ensure_topics(bootstrap_servers, topic, partitions)
        # a short session timeout: the first group assignment waits about half of it (measured on tansu)
        self.consumer = KafkaConsumer(
            topic, self.item_deltas_topic, bootstrap_servers=bootstrap_servers, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
            heartbeat_interval_ms=1000, max_poll_interval_ms=60000, max_poll_records=max_batch)
        # one request in flight: a partition's deltas reach the broker in the order they were sent,
        # which the item watermarks rely on
        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5,
                                      max_in_flight_requests_per_connection=1)
        self.stats = IngestStats()
        self.sent: list = []  # this batch's produce futures
        self.reported_context_keys: set[str] = set()
        self.log_dir = directory / "offline" / "events"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # --- one batch ---

    def run_once(self) -> int:
        """Poll, apply and commit one batch; returns how many messages it held."""
        from kafka.errors import CommitFailedError

        from features.events import InvalidEvent

        polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_batch)
        messages = [m for records in polled.values() for m in records]
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
            self._apply_to_users(events)
            self._log(events)
            self._send_item_deltas(events)
        if deltas:
            self._apply_to_items(deltas)
            self._apply_item_attributes(deltas)
        self.producer.flush()  # dead letters and deltas are safe before their offsets are committed
        failed = [f for f in self.sent if f.failed()]
        if failed:  # flush() waits but does not raise: without this the commit would lose them
            raise IngestError(f"{len(failed)} of {len(self.sent)} dead letters / item deltas were not acknowledged "
                              f"({failed[0].exception!r}); offsets not committed, the batch will be re-delivered")
        try:
            self.consumer.commit()
        except CommitFailedError:
            # the group rebalanced mid-batch: the new owner gets these messages again and the
            # watermarks make it skip what this batch already applied
            self.stats.failed_commits += 1
            log.warning("offsets not committed: the group rebalanced; the batch will be re-delivered")
        self.stats.batches += 1
        from_deltas = sum(m.topic == self.item_deltas_topic for m in messages)
        self.stats.events += len(messages) - from_deltas
        self.stats.item_deltas += from_deltas
        return len(messages)

    def _received(self, message) -> Received:
        """A message of the event topic, judged against the store's schema (InvalidEvent if it does not fit)."""
        from features.events import check_against_schema, decode_event, is_behaviour, unknown_context_keys

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
        from features.events import decode_event, item_category_of, stored_item_attributes

        partition, offset = source_position(message)
        event = decode_event(None, message.value)
        # checked when the event arrived; converted again here, where the row is written (InvalidEvent
        # if the store was reloaded with another schema since)
        attributes = stored_item_attributes(event, self.schema, self.types) if event.item_attributes else {}
        return ItemDelta(partition, offset, event, delta_is_behaviour(message), attributes,
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

    def _apply_to_users(self, events: list[Received]) -> None:
        import pandas as pd

        by_user: dict[int, list[Received]] = defaultdict(list)
        for received in events:
            if received.behaviour:
                by_user[received.event.user_id].append(received)
        if not by_user:
            return
        now = pd.Timestamp(datetime.now(timezone.utc))
        units_per_second = self.schema.units_per_second  # history timestamps in the schema's unit, as loaded

        users = list(by_user)
        current = self.store.get_online_features(
            features=["user_history:history_item_ids", "user_history:history_timestamps",
                      "user_history:interaction_count", "user_history:ingest_source",
                      "user_history:ingest_offset"],
            entity_rows=[{"user_id": u} for u in users]).to_dict()
        rows = []
        for i, user in enumerate(users):
            items = list(current["history_item_ids"][i] or [])
            stamps = list(current["history_timestamps"][i] or [])
            count = current["interaction_count"][i] or 0
            mark_source = current["ingest_source"][i]
            mark_offset = current["ingest_offset"][i] if current["ingest_offset"][i] is not None else -1
            fresh = [r for r in sorted(by_user[user], key=lambda r: r.offset)
                     if not (f"{self.topic}/{r.partition}" == mark_source and r.offset <= mark_offset)]
            self.stats.skipped_duplicates += len(by_user[user]) - len(fresh)
            if not fresh:
                continue
            self.stats.applied += len(fresh)
            merged = list(zip(stamps, items)) + [(r.event.event_time_ms * units_per_second // 1000, r.event.item_id)
                                                 for r in fresh]
            merged.sort(key=lambda pair: pair[0])  # stable: among equal times, arrival order
            merged = merged[-self.history_length:]
            rows.append({"user_id": user, "history_item_ids": [item for _, item in merged],
                         "history_timestamps": [t for t, _ in merged], "interaction_count": count + len(fresh),
                         "ingest_source": f"{self.topic}/{fresh[-1].partition}", "ingest_offset": fresh[-1].offset,
                         "event_timestamp": now})
        if rows:
            self.store.write_to_online_store("user_history", pd.DataFrame(rows))

    def _send_item_deltas(self, events: list[Received]) -> None:
        """Every behaviour and every event with item attributes, re-delivered ones included (the item
        side has its own watermarks), in offset order per partition, keyed by item id."""
        for received in sorted(events, key=lambda r: (r.partition, r.offset)):
            if received.behaviour or received.event.item_attributes:
                headers = [("source_partition", str(received.partition).encode()),
                           ("source_offset", str(received.offset).encode()),
                           ("behaviour", b"1" if received.behaviour else b"0")]
                self.sent.append(self.producer.send(
                    self.item_deltas_topic, key=str(received.event.item_id).encode(),
                    value=received.event.SerializeToString(), headers=headers))

    def _apply_to_items(self, deltas: list[ItemDelta]) -> None:
        """The behaviours among the deltas, counted once each; this ingester owns these items."""
        import pandas as pd

        by_item: dict[int, list[ItemDelta]] = defaultdict(list)
        for delta in deltas:
            if delta.behaviour:  # a delta sent only for its item attributes does not count
                by_item[delta.event.item_id].append(delta)
        if not by_item:
            return
        now = pd.Timestamp(datetime.now(timezone.utc))
        items = list(by_item)
        current = self.store.get_online_features(
            features=["item_counters:interaction_count", "item_counters:ingest_topic",
                      "item_counters:ingest_offsets"],
            entity_rows=[{"item_id": i} for i in items]).to_dict()
        rows = []
        for i, item in enumerate(items):
            # offsets of another topic say nothing about this one (a recreated topic restarts at 0)
            same_topic = current["ingest_topic"][i] == self.topic
            marks = list(current["ingest_offsets"][i] or []) if same_topic else []
            count, changed = current["interaction_count"][i] or 0, False
            for delta in sorted(by_item[item], key=lambda d: (d.partition, d.offset)):
                marks += [-1] * (delta.partition + 1 - len(marks))
                if delta.offset > marks[delta.partition]:
                    marks[delta.partition], count, changed = delta.offset, count + 1, True
            if changed:
                rows.append({"item_id": item, "interaction_count": count, "ingest_topic": self.topic,
                             "ingest_offsets": marks, "event_timestamp": now})
        if rows:
            self.store.write_to_online_store("item_counters", pd.DataFrame(rows))

    def _apply_item_attributes(self, deltas: list[ItemDelta]) -> None:
        """item_profile rows from the deltas' item attributes, over each row's current values (a delta
        may carry some columns only), in event-time order; the row is stamped with its latest event's
        time, so an older event arriving later changes nothing."""
        import pandas as pd

        from features.events import NOT_CARRIED

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
            row = {c: current[c][i] for c in self.item_profile_columns}
            stored_seconds = current["item_category__ts"][i] or 0  # the row's time (0: no row yet)
            latest_ms = None
            for delta in sorted(by_item[item], key=lambda d: d.event.event_time_ms):  # stable: arrival order
                if delta.event.event_time_ms // 1000 < stored_seconds:
                    continue  # the row holds a later event's attributes
                row.update(delta.attributes)
                if delta.category is not NOT_CARRIED:
                    row["item_category"] = delta.category
                latest_ms = delta.event.event_time_ms
            if latest_ms is not None:
                rows.append({"item_id": item, **row,
                             "event_timestamp": pd.Timestamp(latest_ms, unit="ms", tz="UTC")})
        if rows:
            frame = pd.DataFrame(rows, dtype=object)  # object: a missing Int64 / Float32 value stays None
            frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
            self.store.write_to_online_store("item_profile", frame)
            self.stats.item_profiles += len(rows)

    def _log(self, events: list[Received]) -> None:
        """Append the batch to the offline event log (at-least-once; dedupe by event_id)."""
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
            "partition": [r.partition for r in events],
            "offset": [r.offset for r in events],
        })
        first = min((r.partition, r.offset) for r in events)
        path = self.log_dir / f"batch-{time.time_ns()}-p{first[0]}-o{first[1]}.parquet"
        staging = path.with_suffix(".parquet.tmp")  # a kill mid-write leaves only a .tmp behind
        frame.to_parquet(staging, index=False)
        os.replace(staging, path)

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


def read_event_log(directory: Path):
    """The offline event log with re-delivered duplicates dropped."""
    import pandas as pd

    files = sorted((directory / "offline" / "events").glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files]).drop_duplicates("event_id").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    without_torch()
    from features.store import StoreError, data_dir, open_store
    from recsys.config import ConfigError

    parser = argparse.ArgumentParser(prog="plexrec ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, host:port[,...]")
    parser.add_argument("--topic", default="user-events")
    parser.add_argument("--group", default="plexrec-ingest", help="consumer group (run several to scale out)")
    parser.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    parser.add_argument("--profile", default="local", choices=["local", "redis"])
    parser.add_argument("--redis-url", help="host:port of Redis for --profile redis")
    parser.add_argument("--history-length", type=int,
                        help="behaviours kept per user (default: the store's, from store.json; at most that)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help="partitions of the topics the ingester creates when they are missing")
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
        ingester = Ingester(args.bootstrap_servers, open_store(args.profile, directory, args.redis_url), directory,
                            topic=args.topic, group=args.group, history_length=args.history_length,
                            partitions=args.partitions)
    except (StoreError, IngestError, ConfigError) as exc:
        sys.exit(f"plexrec ingest: {exc}")
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
    if failure is not None:
        sys.exit(f"plexrec ingest: {failure}; restart it (a supervisor should)")
    log.info("stopped: %d batches, %d events, %d applied, %d duplicates skipped, %d dead letters, %d item deltas, "
             "%d not behaviours, %d item profiles written", stats.batches, stats.events, stats.applied,
             stats.skipped_duplicates, stats.dead_letters, stats.item_deltas, stats.not_behaviours,
             stats.item_profiles)


if __name__ == "__main__":
    main()
