"""A gRPC fuzz test of the scoring server on loopback: a few thousand generated calls, seeded.

Structured requests with extreme and negative ids (the int64 limits), empty, duplicated and
oversize candidate lists, huge and unicode context maps and request ids, any k; raw bytes
on the wire where a request message belongs (random bytes, valid messages mutated, fields of
the wrong wire type: the "wrong types" a typed client cannot send); deadlines of 0 and of
microseconds. Every call must end with a status a caller can act on (never INTERNAL or
UNKNOWN, which say "server bug"), every OK answer must be well formed, and afterwards the
server must be SERVING and score a valid request as the offline model does.

The server runs the tiny generated schema of test_serving.py: it has context features of both
kinds (a categorical `device`, a numeric `hour`), so context values reach real parsing.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from features.schema import MAX_CONTEXT_ENTRIES, MAX_CONTEXT_TEXT
from features.store import open_store
from protos.plexrec.v1 import scoring_pb2
from serving.client import ScoringClient
from serving.server import ServeConfig, serving_in_background

from .test_serving import TINY_HISTORY, offline_scores, tiny_store, tiny_tables, train_on  # noqa: F401 - fixtures

SEED = 20240613
CALLS = 3000
IN_FLIGHT = 16  # calls outstanding at once: the server sees concurrency, the test keeps a bound
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1
KNOWN_ITEMS, KNOWN_USERS = range(30), range(40)  # tiny_tables' ids
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
METHODS = {"Score": "/plexrec.v1.Scoring/Score", "Rank": "/plexrec.v1.Scoring/Rank"}
BAD_ANSWER = "OK, but a malformed answer"


@pytest.fixture(scope="module")
def fuzz_model(tiny_tables, tmp_path_factory):  # noqa: F811 - the imported fixture
    return train_on(tiny_tables, tmp_path_factory.mktemp("fuzz-run"), "dare", TINY_HISTORY)


@pytest.fixture(scope="module")
def fuzz_server(tiny_store, fuzz_model):  # noqa: F811
    config = ServeConfig(model_dir=str(fuzz_model), port=0)
    with serving_in_background(config, open_store("local", tiny_store)) as running:
        yield running


# --- values ---

def an_id(rng: random.Random, known: range, valid: bool) -> int:
    """A known id, 0, the int64 limits or a random one; ``valid``: never negative."""
    choices = [lambda: rng.choice(known), lambda: rng.choice(known), lambda: 0, lambda: INT64_MAX,
               lambda: INT64_MAX - 1, lambda: rng.randrange(2**31, 2**63)]
    if not valid:
        choices += [lambda: -1, lambda: INT64_MIN, lambda: -rng.randrange(1, 2**63)]
    return rng.choice(choices)()


def some_text(rng: random.Random, longest: int, valid: bool = False) -> str:
    """Unicode of every plane (no lone surrogates: they are not UTF-8, a client cannot send them),
    control characters, right-to-left marks, emoji, or plain ASCII; ``valid``: at most ``longest``."""
    length = rng.choice([0, 1, 3, 16, longest] + ([] if valid else [longest + 1]))
    alphabet = rng.choice([
        lambda: chr(rng.randrange(0x20, 0x7F)),
        lambda: chr(rng.randrange(0, 0x20)),
        lambda: rng.choice("\u200f\u202e\ufeff\u0000\ufffd"),
        lambda: chr(rng.choice([rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)])),
        lambda: rng.choice("🙂👍🏽🇫🇷"),
    ])
    return "".join(alphabet() for _ in range(length))


def a_context_value(rng: random.Random, valid: bool) -> str:
    """Text for a categorical feature, or numbers as text; ``valid``: ones the server must accept."""
    if rng.random() < 0.3:
        return some_text(rng, MAX_CONTEXT_TEXT, valid)
    return rng.choice([
        "ios", "web", "7", "21.5", "-0", "1e308", "-1e308", "1_000", " 3 ", "", "9" * MAX_CONTEXT_TEXT,
        "\uff11\uff12",  # fullwidth digits: Python's float() reads them
    ] + ([] if valid else ["1e309", "-1e309", "nan", "inf", "-inf", "0x1f", "noon"]))


def a_context(rng: random.Random, valid: bool) -> dict[str, str]:
    """Mostly the schema's own keys (device, hour; country and price are features, not context)."""
    sizes = [0, 0, 1, 2, 5, MAX_CONTEXT_ENTRIES] + ([] if valid else [MAX_CONTEXT_ENTRIES + 1, 300])
    context = {}
    for _ in range(rng.choice(sizes)):
        key = rng.choice(["device", "hour", "country", "price", None])
        context[key or some_text(rng, MAX_CONTEXT_TEXT, valid)] = a_context_value(
            rng, valid and key != "hour")  # any text is a valid device; not every text an hour
    if not valid and rng.random() < 0.05:
        context["blob"] = "x" * rng.choice([(1 << 20) - 100, 2 << 20])  # around the 1 MiB message limit
    return context


def item_ids(rng: random.Random, valid: bool) -> list[int]:
    if rng.random() < 0.01:  # at and past the 1,000-candidate limit (ids the cache soon holds)
        return list(range(1000 if valid else rng.choice([1001, 5000])))
    ids = [an_id(rng, KNOWN_ITEMS, valid) for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 20, 64] +
                                                                     ([] if valid else [0])))]
    if valid:
        return list(dict.fromkeys(ids))
    if ids and rng.random() < 0.2:
        ids.append(rng.choice(ids))  # a duplicate
    return ids


# --- calls ---

@dataclass
class Call:
    method: str
    payload: bytes  # the serialized request (or not a request at all)
    timeout: float
    request: object | None  # the message payload encodes, when it is one


def structured(rng: random.Random) -> Call:
    """A typed request: half of them valid (if extreme), half hostile."""
    method, valid = rng.choice(["Score", "Rank"]), rng.random() < 0.5
    fields = {"item_ids": item_ids(rng, valid), "context": a_context(rng, valid),
              "request_id": some_text(rng, 128, valid)}
    if valid or rng.random() < 0.8:
        fields["user_id"] = an_id(rng, KNOWN_USERS, valid)
    if method == "Rank":
        fields["k"] = rng.choice([0, 1, 3, UINT32_MAX, rng.randrange(UINT32_MAX)])
        request = scoring_pb2.RankRequest(**fields)
    else:
        request = scoring_pb2.ScoreRequest(**fields)
    return Call(method, request.SerializeToString(), a_deadline(rng), request)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negatives as protobuf writes them: ten bytes
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def a_wire_field(rng: random.Random) -> bytes:
    """One field of any number and any wire type, valid or not for the field (user_id as bytes,
    item_ids as fixed32, context as a varint, groups, the reserved wire types 6 and 7)."""
    number = rng.choice([1, 2, 3, 4, 5, rng.randrange(1, 1 << 29)])
    wire_type = rng.randrange(8)
    tag = varint(number << 3 | wire_type)
    if wire_type == 0:
        return tag + varint(rng.choice([0, 1, INT64_MAX, -1, rng.getrandbits(64)]))
    if wire_type == 1:
        return tag + rng.randbytes(8)
    if wire_type == 2:
        body = rng.randbytes(rng.randrange(12))
        stated = rng.choice([len(body), len(body), len(body) + 5, 2**31, 2**64 - 1])  # lengths that lie
        return tag + varint(stated) + body
    if wire_type == 5:
        return tag + rng.randbytes(4)
    return tag + rng.randbytes(rng.randrange(4))  # groups (3, 4) and the invalid types (6, 7)


def raw(rng: random.Random) -> Call:
    method = rng.choice(["Score", "Rank"])
    kind = rng.randrange(4)
    if kind == 0:  # random bytes
        payload = rng.randbytes(rng.choice([0, 1, 2, 7, 64, 512]))
    elif kind == 1:  # fields of the wrong wire types
        payload = b"".join(a_wire_field(rng) for _ in range(rng.randrange(1, 6)))
    elif kind == 2:  # a valid request, mutated: bytes flipped, cut short, or garbage appended
        payload = bytearray(structured(rng).payload or b"\x08\x01")
        for _ in range(rng.randrange(1, 4)):
            position = rng.randrange(len(payload))
            payload[position] = rng.randrange(256)
        cut = rng.choice([len(payload), rng.randrange(len(payload) + 1)])
        payload = bytes(payload[:cut]) + (rng.randbytes(3) if rng.random() < 0.3 else b"")
    else:  # the other method's message: Rank's k (a varint) where Score has its context map, and so on
        other = structured(rng)
        payload, method = other.payload, "Rank" if other.method == "Score" else "Score"
    return Call(method, payload, a_deadline(rng), None)


def a_deadline(rng: random.Random) -> float:
    return rng.choice([0.0, 1e-6, 1e-4, 1e-3, 0.01]) if rng.random() < 0.1 else 10.0


def generated_calls(rng: random.Random, count: int) -> list[Call]:
    return [(structured if rng.random() < 0.6 else raw)(rng) for _ in range(count)]


# --- checks ---

def check_answer(call: Call, answer: bytes) -> str | None:
    """What is wrong with an OK answer, or None."""
    request = call.request
    if call.method == "Score":
        response = scoring_pb2.ScoreResponse.FromString(answer)
        scores = list(response.scores)
        expected = len(request.item_ids) if request is not None else len(scores)
    else:
        response = scoring_pb2.RankResponse.FromString(answer)
        scores = [item.score for item in response.items]
        expected = None
        if request is not None:
            expected = min(request.k, len(request.item_ids)) if request.k else len(request.item_ids)
            if not {item.item_id for item in response.items} <= set(request.item_ids):
                return "ranked items that were not asked for"
            if scores != sorted(scores, reverse=True):
                return "ranked out of order"
    if expected is not None and len(scores) != expected:
        return f"{len(scores)} scores for {expected} expected"
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores):
        return f"scores that are not probabilities: {scores[:5]}"
    if not response.model_version:
        return "no model version"
    return None


def run_calls(channel: grpc.Channel, calls: list[Call]) -> list[tuple[Call, grpc.StatusCode | str, str]]:
    """Every call, IN_FLIGHT outstanding at any time, as (call, status, its details or what is wrong
    with its answer)."""
    senders: dict[str, Callable] = {name: channel.unary_unary(path, request_serializer=None,
                                                              response_deserializer=None)
                                    for name, path in METHODS.items()}
    slots = threading.BoundedSemaphore(IN_FLIGHT)
    futures = []
    for call in calls:
        slots.acquire()
        future = senders[call.method].future(call.payload, timeout=call.timeout)
        future.add_done_callback(lambda _: slots.release())
        futures.append(future)
    results = []
    for call, future in zip(calls, futures):
        error = future.exception()
        if error is not None:
            results.append((call, error.code(), error.details() or ""))
        else:
            problem = check_answer(call, future.result())
            results.append((call, grpc.StatusCode.OK if problem is None else BAD_ANSWER, problem or ""))
    return results


def test_generated_calls_never_fail_internal_and_leave_the_server_healthy(
        fuzz_server, tiny_tables, fuzz_model, caplog):  # noqa: F811 - tiny_tables: the imported fixture
    user, items, context = 3, [0, 3, 7, 12, 29, 500], {"device": "ios", "hour": "7"}
    calls = generated_calls(random.Random(SEED), CALLS)
    with ScoringClient(f"127.0.0.1:{fuzz_server.port}") as client:
        before, _ = client.score(user, items, context=context)
        with caplog.at_level(logging.ERROR):
            results = run_calls(client.channel, calls)
        codes = Counter(code for _, code, _ in results)
        unexpected = [(call.method, call.payload[:80], code, details) for call, code, details in results
                      if code not in ALLOWED]
        assert not unexpected, (codes, unexpected[:5])
        # the generator reached every outcome, not one validation error many times over
        assert all(codes[code] >= 20 for code in ALLOWED), codes
        # nothing failed on the server's side and was turned into a status by gRPC's catch-all
        assert not [r for r in caplog.records if r.name.startswith("grpc")], caplog.text[-2000:]
        health = health_pb2_grpc.HealthStub(client.channel)
        for service in ("", "plexrec.v1.Scoring"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        after, _ = client.score(user, items, context=context)
    assert fuzz_server.service.batcher.queued_rows == 0 and not fuzz_server.service.batcher.pending
    np.testing.assert_allclose(after, before, atol=1e-6)
    np.testing.assert_allclose(after, offline_scores(tiny_tables, fuzz_model, user, items,
                                                     {"device": "ios", "hour": 7.0}), atol=1e-5)
