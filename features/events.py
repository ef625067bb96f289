"""User events on Kafka: validation, a small producer, and the replay of a data set.

Kafka key = the user id (decimal ASCII), so one partition owns a user and the
ingester never updates one user from two places at once. No torch here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from google.protobuf.message import DecodeError

from protos.plexrec.v1.events_pb2 import EventType, UserEvent

DEFAULT_TOPIC = "user-events"
DEAD_LETTER_SUFFIX = ".dead-letter"
MAX_ID_LENGTH = 128
MAX_CONTEXT_ENTRIES = 32
MAX_CONTEXT_TEXT = 256
MAX_FUTURE_MS = 24 * 3600 * 1000  # event times more than a day ahead are a client's clock gone wrong
# events that are behaviours (history + counters); impressions are not
BEHAVIOURS = {EventType.EVENT_TYPE_CLICK, EventType.EVENT_TYPE_RATING, EventType.EVENT_TYPE_PURCHASE,
              EventType.EVENT_TYPE_ADD_TO_CART}


class InvalidEvent(ValueError):
    """A message that is not a valid UserEvent; its text is the reason sent to the dead-letter topic."""


def decode_event(key: bytes | None, value: bytes | None, now_ms: int | None = None) -> UserEvent:
    """The event in a Kafka message, or InvalidEvent saying what is wrong with it."""
    if value is None:
        raise InvalidEvent("empty message (no value)")
    try:
        event = UserEvent.FromString(value)
    except DecodeError as exc:
        raise InvalidEvent(f"not a plexrec.v1.UserEvent: {exc}") from None
    if not event.event_id:
        raise InvalidEvent("event_id is missing")
    if len(event.event_id) > MAX_ID_LENGTH:
        raise InvalidEvent(f"event_id is longer than {MAX_ID_LENGTH} characters")
    if event.user_id <= 0:
        raise InvalidEvent(f"user_id must be a positive id, got {event.user_id}")
    if event.item_id <= 0:
        raise InvalidEvent(f"item_id must be a positive id, got {event.item_id}")
    if event.event_type not in EventType.values() or event.event_type == EventType.EVENT_TYPE_UNSPECIFIED:
        raise InvalidEvent(f"event_type {event.event_type} is missing or unknown")
    if event.event_time_ms <= 0:
        raise InvalidEvent("event_time_ms is missing")
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    if event.event_time_ms > now_ms + MAX_FUTURE_MS:
        raise InvalidEvent(f"event_time_ms {event.event_time_ms} is more than a day in the future")
    if len(event.context) > MAX_CONTEXT_ENTRIES:
        raise InvalidEvent(f"context has {len(event.context)} entries; at most {MAX_CONTEXT_ENTRIES}")
    if any(len(k) > MAX_CONTEXT_TEXT or len(v) > MAX_CONTEXT_TEXT for k, v in event.context.items()):
        raise InvalidEvent(f"a context key or value is longer than {MAX_CONTEXT_TEXT} characters")
    if key is not None and key != str(event.user_id).encode():
        raise InvalidEvent(f"message key {key[:40]!r} is not the user_id {event.user_id}")
    return event


def make_event(user_id: int, item_id: int, event_type: int = EventType.EVENT_TYPE_CLICK,
               event_time_ms: int | None = None, value: float | None = None, event_id: str | None = None,
               context: dict[str, str] | None = None) -> UserEvent:
    event = UserEvent(event_id=event_id or uuid.uuid4().hex, user_id=user_id, item_id=item_id,
                      event_type=event_type, event_time_ms=event_time_ms or int(time.time() * 1000),
                      context=context or {})
    if value is not None:
        event.value = value
    return event


class EventProducer:
    """Publish UserEvents keyed by user id. Works against any Kafka cluster."""

    def __init__(self, bootstrap_servers: str, topic: str = DEFAULT_TOPIC, **kafka_options) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5,
                                      **kafka_options)

    def send(self, event: UserEvent):
        return self.producer.send(self.topic, key=str(event.user_id).encode(), value=event.SerializeToString())

    def send_all(self, events: Iterable[UserEvent], rate_per_second: float | None = None) -> int:
        """Send events in order, at most ``rate_per_second`` (None: as fast as possible)."""
        started, sent = time.monotonic(), 0
        for event in events:
            if rate_per_second:
                wait = started + sent / rate_per_second - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            self.send(event)
            sent += 1
        self.producer.flush()
        return sent

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def movielens_events(folder, after_fraction: float = 0.0, limit: int | None = None) -> list[UserEvent]:
    """ML-100K's ratings as events in time order; ``after_fraction`` skips the earliest share
    (e.g. 0.8: replay the last 20%, the part a model trained on the rest has not seen)."""
    from recsys.data.movielens import load_movielens

    frame, _ = load_movielens(folder)
    frame = frame.sort_values("timestamp", kind="stable")
    frame = frame.iloc[int(len(frame) * after_fraction):]
    if limit is not None:
        frame = frame.iloc[:limit]
    return rating_events(frame)


def rating_events(frame) -> list[UserEvent]:
    """Rating events of a ratings frame (user_id, item_id, timestamp in seconds, rating), in the
    frame's order; the event id names the rating, so a replay of the same rating is a duplicate."""
    return [make_event(user_id=int(u), item_id=int(i), event_type=EventType.EVENT_TYPE_RATING,
                       event_time_ms=int(t) * 1000, value=float(r), event_id=f"ml100k-{u}-{i}-{t}")
            for u, i, t, r in zip(frame.user_id, frame.item_id, frame.timestamp, frame.rating)]


def replay_main(argv: list[str] | None = None) -> None:
    """`plexrec replay`: publish a data set's interactions as events, in time order, at a rate."""
    import argparse
    import logging

    from recsys.config import PROJECT_ROOT

    parser = argparse.ArgumentParser(prog="plexrec replay", description=replay_main.__doc__.split(":", 1)[1])
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, host:port[,...]")
    parser.add_argument("--topic", default=DEFAULT_TOPIC)
    parser.add_argument("--data", default=str(PROJECT_ROOT / "data" / "ml-100k"), help="a GroupLens folder")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (0: as fast as possible)")
    parser.add_argument("--after-fraction", type=float, default=0.0,
                        help="skip the earliest share of the data, e.g. 0.8 replays the last 20%%")
    parser.add_argument("--limit", type=int, help="at most this many events")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    events = movielens_events(args.data, args.after_fraction, args.limit)
    producer = EventProducer(args.bootstrap_servers, args.topic)
    started = time.monotonic()
    sent = producer.send_all(events, rate_per_second=args.rate or None)
    producer.close()
    logging.getLogger("plexrec.replay").info("published %d events to %s in %.1f s", sent, args.topic,
                                             time.monotonic() - started)
