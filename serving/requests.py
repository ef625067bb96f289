"""What a scoring request must be: decoded without raising, and checked field by field, so a bad
one is answered ``INVALID_ARGUMENT`` naming the field (never UNKNOWN, never a server fault)."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from features.schema import MAX_CONTEXT_ENTRIES, MAX_CONTEXT_TEXT  # one limit for events and requests

MAX_REQUEST_ID = 128


class InvalidRequest(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class UndecodableRequest:
    """What the server got where a request message belongs, when it is none (random bytes, a
    truncated message, a string field that is not UTF-8). gRPC's own parsing would fail the call
    UNKNOWN: a server fault to monitoring, where the fault is the caller's."""

    message_type: str
    problem: str


def tolerant_parser(message_class):
    """A request deserializer that never raises: a message, or an UndecodableRequest."""
    def parse(raw: bytes):
        try:
            return message_class.FromString(raw)
        except DecodeError as exc:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, str(exc))
    return parse


def validate(request, max_candidates: int) -> None:
    """Raise InvalidRequest naming the first bad field of a Score or Rank request."""
    if isinstance(request, UndecodableRequest):
        raise InvalidRequest("request", f"is not a valid {request.message_type} message ({request.problem})")
    # optional in the proto: id 0 is a real user in some data sets, so "not sent" must be told apart
    if not request.HasField("user_id"):
        raise InvalidRequest("user_id", "is missing; send the user's id (>= 0)")
    if request.user_id < 0:
        raise InvalidRequest("user_id", f"must be an id >= 0, got {request.user_id}")
    if not request.item_ids:
        raise InvalidRequest("item_ids", "is empty; send at least one candidate")
    if len(request.item_ids) > max_candidates:
        raise InvalidRequest("item_ids", f"has {len(request.item_ids)} candidates; at most {max_candidates}")
    item_ids = list(request.item_ids)
    if min(item_ids) < 0:  # min and set run in C: the loops below only run to name the culprit
        raise InvalidRequest("item_ids", f"must be ids >= 0, got {next(i for i in item_ids if i < 0)}")
    if len(set(item_ids)) != len(item_ids):
        seen: set[int] = set()
        for item in item_ids:
            if item in seen:
                raise InvalidRequest("item_ids", f"item {item} appears more than once")
            seen.add(item)
    if len(request.context) > MAX_CONTEXT_ENTRIES:
        raise InvalidRequest("context", f"has {len(request.context)} entries; at most {MAX_CONTEXT_ENTRIES}")
    if any(len(k) > MAX_CONTEXT_TEXT or len(v) > MAX_CONTEXT_TEXT for k, v in request.context.items()):
        raise InvalidRequest("context", f"a key or value is longer than {MAX_CONTEXT_TEXT} characters")
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest("request_id", f"is longer than {MAX_REQUEST_ID} characters")
