"""User events on Kafka: validation, a small producer, and the replay of a data set.

Kafka key = the user id (decimal ASCII), so one partition owns a user and the
ingester never updates one user from two places at once. An event is checked
twice: ``decode_event`` checks what any UserEvent must be, ``check_against_schema``
what the store it feeds expects (the schema in store.json: how events are labelled,
which context values are numbers, which item attributes exist). No torch here.

The label of an event (what decides whether it is a behaviour, see ``is_behaviour``):

    its ``label`` field, if set (0 or 1)
    else, in a rating schema: its ``value`` >= the schema's rating_threshold (value required)
    else by type: CLICK, PURCHASE, ADD_TO_CART = 1, IMPRESSION = 0; a RATING needs a value
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from typing import Any

from google.protobuf.message import DecodeError

from features.datasets import read_tables
from features.errors import ConfigError
from features.kafka_options import KafkaOptionsError, add_kafka_arguments, kafka_options, unreachable
from features.schema import DataError, DatasetSchema, MAX_CONTEXT_ENTRIES, MAX_CONTEXT_TEXT, first_value, value_text
from features.store import PROJECT_ROOT
from protos.plexrec.v1.events_pb2 import EventType, UserEvent

DEFAULT_TOPIC = "user-events"
DEAD_LETTER_SUFFIX = ".dead-letter"
MAX_ID_LENGTH = 128
MAX_ITEM_ATTRIBUTES = 64
MAX_ATTRIBUTE_TEXT = 4096  # a multi-valued attribute (tags, genres) can be long
MAX_FUTURE_MS = 24 * 3600 * 1000  # event times more than a day ahead are a client's clock gone wrong
# the label an event type implies when the event carries none (a rating is labelled by its value)
TYPE_LABELS = {EventType.EVENT_TYPE_IMPRESSION: 0, EventType.EVENT_TYPE_CLICK: 1,
               EventType.EVENT_TYPE_PURCHASE: 1, EventType.EVENT_TYPE_ADD_TO_CART: 1}
LIST_SEPARATOR = "|"  # joins the values of a list column (a multi-valued column without separator) in text


class InvalidEvent(ValueError):
    """A message that is not a valid UserEvent; its text is the reason sent to the dead-letter topic."""


def decode_event(key: bytes | None, value: bytes | None, now_ms: int | None = None) -> UserEvent:
    """The event in a Kafka message, or InvalidEvent saying what is wrong with it (whatever the store)."""
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
    for name in ("user_id", "item_id"):  # ids start at 0 in some data sets: only absence or < 0 is wrong
        if not event.HasField(name):
            raise InvalidEvent(f"{name} is missing")
        if getattr(event, name) < 0:
            raise InvalidEvent(f"{name} must be an id >= 0, got {getattr(event, name)}")
    if event.event_type not in EventType.values() or event.event_type == EventType.EVENT_TYPE_UNSPECIFIED:
        raise InvalidEvent(f"event_type {event.event_type} is missing or unknown")
    if event.event_time_ms <= 0:
        raise InvalidEvent("event_time_ms is missing")
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    if event.event_time_ms > now_ms + MAX_FUTURE_MS:
        raise InvalidEvent(f"event_time_ms {event.event_time_ms} is more than a day in the future")
    if event.HasField("label") and event.label not in (0, 1):
        raise InvalidEvent(f"label must be 0 or 1, got {event.label}")
    if event.HasField("value") and not math.isfinite(event.value):
        raise InvalidEvent(f"value must be a finite number, got {event.value}")
    if len(event.context) > MAX_CONTEXT_ENTRIES:
        raise InvalidEvent(f"context has {len(event.context)} entries; at most {MAX_CONTEXT_ENTRIES}")
    if any(len(k) > MAX_CONTEXT_TEXT or len(v) > MAX_CONTEXT_TEXT for k, v in event.context.items()):
        raise InvalidEvent(f"a context key or value is longer than {MAX_CONTEXT_TEXT} characters")
    if len(event.item_attributes) > MAX_ITEM_ATTRIBUTES:
        raise InvalidEvent(f"item_attributes has {len(event.item_attributes)} entries; at most {MAX_ITEM_ATTRIBUTES}")
    if any(len(k) > MAX_CONTEXT_TEXT or len(v) > MAX_ATTRIBUTE_TEXT for k, v in event.item_attributes.items()):
        raise InvalidEvent(f"an item_attributes key is longer than {MAX_CONTEXT_TEXT} characters or a value longer "
                           f"than {MAX_ATTRIBUTE_TEXT}")
    if key is not None and key != str(event.user_id).encode():
        raise InvalidEvent(f"message key {key[:40]!r} is not the user_id {event.user_id}")
    return event


# --- the event against the store's schema ---

def check_against_schema(event: UserEvent, schema, types: dict[str, str] | None = None) -> int:
    """The event's 0/1 label under ``schema`` (a features.schema.DatasetSchema), or InvalidEvent
    naming what does not fit: a label it cannot have, a numeric context value or an item attribute
    that is not a number, an item attribute the schema does not declare. With ``types`` (store.json's
    Feast type per column), item attributes must also convert to the type the store keeps."""
    label = event_label(event, schema)
    for column in schema.context.numeric:
        if column in event.context:
            _number(event.context[column], f"context['{column}']", schema)
    if event.item_attributes:
        stored_item_attributes(event, schema, types)
    return label


def event_label(event: UserEvent, schema) -> int:
    """The event's 0/1 label: its label field, else its rating (rating schemas), else its type."""
    if event.HasField("label"):
        return int(event.label)
    if schema.rating or event.event_type == EventType.EVENT_TYPE_RATING:
        if not event.HasField("value"):
            rule = (f"labels events by rating (label = value >= {schema.rating_threshold:g})" if schema.rating
                    else f"is labelled by the 0/1 column '{schema.label}', and a RATING event is labelled by its "
                         f"value (>= {schema.rating_threshold:g})")
            raise InvalidEvent(f"value is missing: the store's schema '{schema.name}' {rule}; send the rating in "
                               "value, or a 0/1 label")
        return int(event.value >= schema.rating_threshold)
    return TYPE_LABELS[event.event_type]


def is_behaviour(label: int, schema) -> bool:
    """Whether an event enters the user's history and the interaction counters: every labelled
    event (history: all) or the positive ones (history: positive), as the loader decides for rows."""
    return schema.history == "all" or label == 1


def unknown_context_keys(event: UserEvent, schema) -> list[str]:
    """Context keys that are no context column of the schema: free-form, kept in the event log only."""
    return [key for key in event.context if key not in schema.context.columns]


def item_attribute_columns(schema) -> list[str]:
    """The item attributes an event may carry: the items group's columns, and the category column
    (which may be the interactions' own: it feeds item_category)."""
    columns = list(schema.items.columns)
    return columns + [schema.category] if schema.category and schema.category not in columns else columns


def stored_item_attributes(event: UserEvent, schema, types: dict[str, str] | None = None) -> dict[str, Any]:
    """The event's item attributes that are item_profile columns, as the store keeps them (store.json's
    types: Int64 -> int, Float32 -> float, String -> the text, Array(...) -> the values split on the
    schema's separator, or '|' for list columns); InvalidEvent names the first that does not fit."""
    allowed = item_attribute_columns(schema)
    stored = {}
    for key, text in event.item_attributes.items():
        if key not in allowed:
            raise InvalidEvent(f"item_attributes['{key}'] is not a column of the store's schema '{schema.name}' "
                               f"items ({', '.join(allowed) or 'it declares none'}); send only those")
        if key in schema.items.columns:
            stored[key] = _stored_value(key, text, schema, (types or {}).get(key))
    return stored


NOT_CARRIED = object()  # an event without the category attribute leaves item_category as it is


def item_category_of(event: UserEvent, schema):
    """item_category as the loader writes it (its first value, as text) if the event carries the
    category attribute; else NOT_CARRIED."""
    if not schema.category or schema.category not in event.item_attributes:
        return NOT_CARRIED
    separator = None
    if schema.category in schema.multi_valued:
        separator = schema.multi_valued[schema.category] or LIST_SEPARATOR
    return first_value(event.item_attributes[schema.category], separator)


def _stored_value(key: str, text: str, schema, type_name: str | None):
    where = f"item_attributes['{key}']"
    if key in schema.items.numeric or type_name == "Float32":
        return _number(text, where, schema)
    separator = schema.multi_valued.get(key) or LIST_SEPARATOR
    if type_name == "Int64":
        return _integer(text, where, "Int64")
    if type_name == "Array(Int64)":
        return [_integer(v, where, "Array(Int64)") for v in text.split(separator) if v != ""]
    if type_name == "Array(String)" or (type_name is None and key in schema.multi_valued
                                         and schema.multi_valued[key] is None):
        return [v for v in text.split(separator) if v != ""]
    return text  # String (a multi-valued column with a separator is stored as its joined text)


def _number(text: str, where: str, schema) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InvalidEvent(f"{where} = {text[:40]!r} is not a number (a numeric column of the store's schema "
                           f"'{schema.name}'); send decimal text such as '12.5'")
    return number


def _integer(text: str, where: str, type_name: str) -> int:
    try:
        return int(text)  # exact, however large the id
    except ValueError:
        pass
    try:
        number = float(text)  # "3.0": how a float column writes an integer
        if number.is_integer():
            return int(number)
    except (ValueError, OverflowError):
        pass
    raise InvalidEvent(f"{where} = {text[:40]!r} is not an integer: the store keeps this column as {type_name} "
                       "(store.json); send its values as decimal integers")


# --- producing ---

def make_event(user_id: int | None, item_id: int | None, event_type: int = EventType.EVENT_TYPE_CLICK,
               event_time_ms: int | None = None, value: float | None = None, event_id: str | None = None,
               context: dict[str, str] | None = None, label: int | None = None,
               item_attributes: dict[str, str] | None = None) -> UserEvent:
    """A UserEvent; ``None`` leaves an optional field unset (a missing id is an invalid event)."""
    event = UserEvent(event_id=event_id or uuid.uuid4().hex, event_type=event_type,
                      event_time_ms=event_time_ms or int(time.time() * 1000), context=context or {},
                      item_attributes=item_attributes or {})
    for name, given in (("user_id", user_id), ("item_id", item_id), ("value", value), ("label", label)):
        if given is not None:
            setattr(event, name, given)
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


# --- a data set's own rows as events ---

def schema_events(frame, schema) -> list[UserEvent]:
    """Events of an interactions frame in ``schema``'s column names, in the frame's order: RATING
    events with the rating as value (rating schemas) or IMPRESSION events with the 0/1 label (label
    schemas), the context columns as text. The event id names the row, so a replay of the same row
    is a duplicate."""
    to_ms = 1000 // schema.units_per_second
    users, items = frame[schema.user].tolist(), frame[schema.item].tolist()
    times = frame[schema.timestamp].tolist()
    context_values = {c: frame[c].map(value_text).tolist() for c in schema.context.columns}
    contexts = [{c: values[row] for c, values in context_values.items() if values[row] is not None}
                for row in range(len(frame))]
    if schema.rating:
        kind, fields = EventType.EVENT_TYPE_RATING, [{"value": float(r)} for r in frame[schema.rating].tolist()]
    else:
        kind, fields = EventType.EVENT_TYPE_IMPRESSION, [{"label": int(v)} for v in frame[schema.label].tolist()]
    return [make_event(user_id=int(u), item_id=int(i), event_type=kind, event_time_ms=int(t) * to_ms,
                       event_id=f"{schema.name}-{int(u)}-{int(i)}-{int(t)}", context=context, **extra)
            for u, i, t, context, extra in zip(users, items, times, contexts, fields)]


def replay_events(schema, after_fraction: float = 0.0, limit: int | None = None) -> list[UserEvent]:
    """A data set's interactions as events in time order; ``after_fraction`` skips the earliest share
    (e.g. 0.8: replay the last 20%, the part a model trained on the rest has not seen)."""
    frame = read_tables(schema).interactions.sort_values(schema.timestamp, kind="stable")
    frame = frame.iloc[int(len(frame) * after_fraction):]
    if limit is not None:
        frame = frame.iloc[:limit]
    return schema_events(frame, schema)


def replay_main(argv: list[str] | None = None) -> None:
    """`plexrec replay`: publish a data set's interactions as events, in time order, at a rate."""
    import argparse
    import logging
    import sys

    parser = argparse.ArgumentParser(prog="plexrec replay", description=replay_main.__doc__.split(":", 1)[1])
    add_kafka_arguments(parser, creates_topics=False)  # the topic is the ingester's, or the broker's default
    parser.add_argument("--topic", default=DEFAULT_TOPIC)
    parser.add_argument("--schema", default=str(PROJECT_ROOT / "data" / "ml-100k" / "schema.yaml"),
                        help="the data set's schema file (default: MovieLens 100K)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (0: as fast as possible)")
    parser.add_argument("--after-fraction", type=float, default=0.0,
                        help="skip the earliest share of the data, e.g. 0.8 replays the last 20%%")
    parser.add_argument("--limit", type=int, help="at most this many events")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        kafka = kafka_options(args)
        events = replay_events(DatasetSchema.from_yaml(args.schema), args.after_fraction, args.limit)
    except (ConfigError, DataError, KafkaOptionsError) as exc:
        sys.exit(f"plexrec replay: {exc}")
    try:
        producer = EventProducer(kafka.pop("bootstrap_servers"), args.topic, **kafka)
    except Exception as exc:
        message = unreachable("plexrec replay", args, exc)
        if message is None:
            raise
        sys.exit(message)
    started = time.monotonic()
    sent = producer.send_all(events, rate_per_second=args.rate or None)
    producer.close()
    logging.getLogger("plexrec.replay").info("published %d events to %s in %.1f s", sent, args.topic,
                                             time.monotonic() - started)
