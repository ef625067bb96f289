"""The gRPC scoring server.

    plexrec serve --model-dir runs/ml100k_sequence/models [--port 50051] [--metrics-port 9464]

Per call: validate the request (``INVALID_ARGUMENT`` naming the field), read the
user's profile and history from the online store and the candidates' features
through the item cache (features/online.py), take the schema's context features
from the request's ``context``, build the model inputs by training's rules
(serving/inputs.py), score them on the exported model's fast inference path
(recsys/inference.py, held to the exported model's scores to 1e-5) under
``torch.inference_mode``, return click probabilities. What is read follows the data set's schema (the
store's store.json); a model trained on another schema is refused at load.
Calls wait on the event loop; one model thread reads the store for a whole batch
of them, builds its inputs and scores it, and whatever arrived meanwhile is the
next batch (serving/batcher.py says why this shape).

Also served: standard gRPC health checking (``grpc.health.v1.Health``) and
server reflection. Optional TLS (``--tls-cert/--tls-key``) and bearer-token
authentication (``--token-file`` or $PLEXREC_TOKEN; health stays open for load
balancers). Prometheus metrics on ``--metrics-port``. A newer model version
under ``--model-dir`` is loaded in the background and swapped in atomically; a
broken one is refused with a log line and the old one keeps serving.

Load is shed, not queued without end: at most ``--max-concurrent-calls`` calls are
in the server at once (gRPC refuses the others with ``RESOURCE_EXHAUSTED``) and at
most ``--max-queued-rows`` candidate rows wait for the model (a call past it is
refused ``RESOURCE_EXHAUSTED`` at once). A request that is not a valid message of
its type (random bytes, bad UTF-8) is ``INVALID_ARGUMENT``, like any bad field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from features.schema import MAX_CONTEXT_ENTRIES, MAX_CONTEXT_TEXT  # one limit for events and requests
from features.online import DEFAULT_MAX_CACHED_BYTES, DEFAULT_MAX_CACHED_ITEMS, OnlineFeatures
from protos.plexrec.v1 import scoring_pb2, scoring_pb2_grpc
from serving.auth import TokenError, is_loopback, read_token
from serving.batcher import ModelBatcher, Overloaded
from serving.inputs import InvalidContext, request_context
from serving.metrics import ServingMetrics
from serving.model import ModelWatcher

log = logging.getLogger("plexrec.serving")

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
MAX_REQUEST_ID = 128
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # never behind the token


@dataclass
class ServeConfig:
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    max_candidates: int = 1000
    max_message_bytes: int = 1 << 20
    max_batch_rows: int = 4096  # concurrent calls scored in one forward, up to this many rows
    # load shedding: candidate rows waiting for the model, and calls in the server at once
    # (None: no limit); past either, calls are refused RESOURCE_EXHAUSTED at once
    max_queued_rows: int = 16384
    max_concurrent_calls: int | None = 256
    reload_seconds: float = 5.0
    item_cache_seconds: float = 60.0
    item_cache_entries: int = DEFAULT_MAX_CACHED_ITEMS
    item_cache_bytes: int = DEFAULT_MAX_CACHED_BYTES
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None  # None: no authentication; "" is refused (it cannot mean "closed")

    def check(self) -> None:
        """ValueError naming the setting that cannot work."""
        if self.token is not None and not self.token.strip():
            raise ValueError("the bearer token is empty: give the token, or None for no authentication")
        if self.max_queued_rows < self.max_candidates:
            raise ValueError(f"--max-queued-rows {self.max_queued_rows} is below --max-candidates "
                             f"{self.max_candidates}: the largest allowed call could never be queued")
        if self.max_concurrent_calls is not None and self.max_concurrent_calls < 1:
            raise ValueError(f"--max-concurrent-calls must be at least 1, got {self.max_concurrent_calls}")
        # a batch of calls is scored in pieces whose items fit the model's item vector cache (ScoringService
        # .score_batch), so only one call's own candidates must fit it
        if self.item_cache_entries < self.max_candidates:
            raise ValueError(f"--item-cache-entries {self.item_cache_entries} is below --max-candidates "
                             f"{self.max_candidates}: a call of that many distinct candidates could never be scored "
                             f"(the model's item vectors are cached per item); raise --item-cache-entries or lower "
                             f"--max-candidates")

    def check_history(self, history_length: int) -> None:
        """ValueError unless one user's history (at most the store's ``history_length`` items) fits the
        item vector cache."""
        if self.item_cache_entries < history_length:
            raise ValueError(f"--item-cache-entries {self.item_cache_entries} is below the store's history length "
                             f"{history_length} (store.json history_length): one user's history could never be "
                             f"scored (the model's item vectors are cached per item); raise --item-cache-entries to "
                             f"at least {history_length}")


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


def add_scoring_service(service: scoring_pb2_grpc.ScoringServicer, server) -> None:
    """As the generated add_ScoringServicer_to_server, with requests parsed by tolerant_parser."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            service.Score, request_deserializer=tolerant_parser(scoring_pb2.ScoreRequest),
            response_serializer=scoring_pb2.ScoreResponse.SerializeToString),
        "Rank": grpc.unary_unary_rpc_method_handler(
            service.Rank, request_deserializer=tolerant_parser(scoring_pb2.RankRequest),
            response_serializer=scoring_pb2.RankResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


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


@dataclass
class ScoringCall:
    """One admitted call as the batcher hands it to ``ScoringService.score_batch`` (on the model thread)."""

    request: Any  # ScoreRequest or RankRequest
    context: dict[str, Any]  # its parsed context features
    grpc_context: Any  # for its deadline


@dataclass
class CallTiming:
    """Seconds of the batch a call was scored in, per stage (the server's latency metrics)."""

    feature_fetch: float
    model_inputs: float
    forward: float
    calls: int


class ScoringService(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, watcher: ModelWatcher, online: OnlineFeatures, config: ServeConfig,
                 metrics: ServingMetrics) -> None:
        self.watcher, self.online, self.config, self.metrics = watcher, online, config, metrics
        self.batcher = ModelBatcher(self.score_batch, config.max_batch_rows, config.max_queued_rows)

    async def Score(self, request, context):
        scores, version = await self._scores("Score", request, context)
        return scoring_pb2.ScoreResponse(scores=scores.tolist(), model_version=version, request_id=request.request_id)

    async def Rank(self, request, context):
        scores, version = await self._scores("Rank", request, context)
        order = np.argsort(-scores, kind="stable")  # ties keep request order
        if request.k:
            order = order[:request.k]
        items = [scoring_pb2.ScoredItem(item_id=request.item_ids[i], score=float(scores[i])) for i in order]
        return scoring_pb2.RankResponse(items=items, model_version=version, request_id=request.request_id)

    async def _scores(self, method: str, request, context) -> tuple[np.ndarray, str]:
        started = time.perf_counter()
        self.metrics.calls.labels(method).inc()
        try:
            validate(request, self.config.max_candidates)
            call = ScoringCall(request, request_context(self.online.schema, request.context), context)
            model = self.watcher.current  # one read: this call uses one model from start to end
            scores, timing = await self.batcher.submit(model, call, len(request.item_ids))
            if context.time_remaining() == 0:  # scored too late: no one waits for the answer any more
                raise DeadlineExpired()
        except (InvalidRequest, InvalidContext) as exc:
            await self._fail(method, request, context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except DeadlineExpired:
            await self._fail(method, request, context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             "the deadline passed before the scores were ready")
        except Overloaded as exc:
            await self._fail(method, request, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"server overloaded: {exc}; retry with backoff")
        except Exception as exc:  # noqa: BLE001 - a request must fail with a status, not a stack trace
            await self._fail(method, request, context, grpc.StatusCode.UNAVAILABLE if _store_down(exc)
                             else grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        for stage in ("feature_fetch", "model_inputs", "forward"):
            self.metrics.latency.labels(stage).observe(getattr(timing, stage))
        self.metrics.batch_calls.observe(timing.calls)
        self.metrics.latency.labels("total").observe(time.perf_counter() - started)
        self.metrics.candidates.observe(len(request.item_ids))
        return scores, model.version

    def score_batch(self, model, calls: list[ScoringCall]) -> list:
        """(probabilities, CallTiming) per call, or the exception that fails it: the users and items of
        every call in one store read, one set of model inputs, one forward."""
        started = time.perf_counter()
        try:
            users, candidates, history_items = self._fetch(model, calls)
        except Exception as exc:  # noqa: BLE001 - the store's failure is every call's answer
            return [exc] * len(calls)
        fetched = time.perf_counter()
        results: list = [None] * len(calls)
        live = []
        for position, call in enumerate(calls):
            remaining = call.grpc_context.time_remaining()
            if remaining is not None and remaining <= 0:
                results[position] = DeadlineExpired()
            else:
                live.append(position)
        if not live:
            return results
        build = forward = 0.0
        for group in cache_sized_groups(model, users, candidates, live):
            began = time.perf_counter()
            inputs = model.batch([(users[p], candidates[p]) for p in group], history_items)
            built = time.perf_counter()
            scores = model.probabilities(inputs)
            build, forward = build + built - began, forward + time.perf_counter() - built
            start = 0
            for position in group:
                end = start + len(candidates[position])
                results[position] = scores[start:end]
                start = end
        timing = CallTiming(fetched - started, build, forward, len(live))
        for position in live:
            results[position] = (results[position], timing)
        return results

    def _fetch(self, model, calls: list[ScoringCall]) -> tuple[list, list, dict]:
        """Per call its user (with the call's context) and its candidates in request order; the history
        items of all (for their features): one store round trip for whatever the item cache misses."""
        self.online.use_model_version(model.version)
        users = self.online.users([call.request.user_id for call in calls])
        wanted: list[int] = []
        history_ids: list[int] = []
        for call, user in zip(calls, users):
            user.context = call.context  # a per-call value, like the profile the same in every candidate row
            wanted.extend(call.request.item_ids)
            if model.history_length:
                history_ids.extend(user.history_item_ids[-model.history_length:])
        items = self.online.items(wanted + history_ids)
        candidates = [[items[i] for i in call.request.item_ids] for call in calls]
        return users, candidates, {i: items[i] for i in history_ids}

    async def _fail(self, method: str, request, context, code: grpc.StatusCode, message: str) -> None:
        self.metrics.errors.labels(method, code.name).inc()
        decoded = not isinstance(request, UndecodableRequest)
        log.warning(json.dumps({"event": "call_failed", "method": method, "code": code.name, "message": message,
                                "request_id": request.request_id if decoded else None,
                                "user_id": request.user_id if decoded and request.HasField("user_id") else None,
                                "candidates": len(request.item_ids) if decoded else None}))
        if context.time_remaining() == 0:
            # the caller's deadline has passed and gRPC has answered DEADLINE_EXCEEDED: a status sent now
            # fails inside gRPC, which logs an ERROR with a traceback (one per late call). Cancelling
            # ends the call quietly.
            raise asyncio.CancelledError()
        await context.abort(code, message)


class DeadlineExpired(Exception):
    pass


def cache_sized_groups(model, users: list, candidates: list, live: list[int]) -> list[list[int]]:
    """The calls at ``live`` in consecutive groups, one forward each, whose distinct candidates and
    whose users' distinct history items each fit the model's item vector cache (``ItemVectorCache``
    refuses a lookup of more distinct items than it holds, and serving/inputs.py looks up a batch's
    candidates and its histories separately). Usually one group: splitting starts only when the
    calls' rows or history lengths add up past the cache. One call always fits: the server refuses
    a cache smaller than --max-candidates or the store's history length at start."""
    bound = model.inputs.item_vectors.max_items
    length = model.history_length

    def history(position: int) -> list[int]:
        return users[position].history_item_ids[-length:] if length else []

    if sum(len(candidates[p]) for p in live) <= bound and sum(len(history(p)) for p in live) <= bound:
        return [live]
    groups: list[list[int]] = []
    items: set[int] = set()
    behaviours: set[int] = set()
    for position in live:
        mine = {item.item_id for item in candidates[position]}
        theirs = set(history(position))
        if not groups or len(items) + len(mine - items) > bound or len(behaviours) + len(theirs - behaviours) > bound:
            groups.append([])
            items, behaviours = set(), set()
        groups[-1].append(position)
        items |= mine
        behaviours |= theirs
    return groups


def _store_down(exc: Exception) -> bool:
    from features.store import StoreError

    return isinstance(exc, StoreError)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Calls must carry ``authorization: Bearer <token>``; health checks and reflection need none."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

        self.refusal = refuse

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self.expected.encode()):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(
            self.refusal, request_deserializer=handler.request_deserializer if handler else None,
            response_serializer=handler.response_serializer if handler else None)


class ScoringServer:
    """The running server: ``await start()``, then ``port``, ``metrics_port``, ``await stop()``."""

    def __init__(self, config: ServeConfig, store) -> None:
        config.check()
        self.config = config
        # the store's store.json (schema, history length): what every model is checked against
        self.online = OnlineFeatures(store, ttl_seconds=config.item_cache_seconds,
                                     max_cached_items=config.item_cache_entries,
                                     max_cached_bytes=config.item_cache_bytes,
                                     published_vectors=False)  # the model computes them (serving/inputs.py)
        config.check_history(self.online.history_length)
        self.watcher = ModelWatcher(config.model_dir, self.online.meta, max_cached_items=config.item_cache_entries)
        self.metrics = ServingMetrics()
        self.metrics.model_version(self.watcher.current.version)
        self.service = ScoringService(self.watcher, self.online, config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port = self.metrics_port = None
        self._reload_task: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            self._release()  # a server that did not start leaves no thread or port behind
            raise

    async def _start(self) -> None:
        config = self.config
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   # gRPC shares a port with another server by default: a second `plexrec serve` on a
                   # busy port would silently take half the calls; fail instead
                   ("grpc.so_reuseport", 0)]
        # past the limit gRPC answers RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" itself (health
        # checks and reflection count too: grpcio 1.85 has one limit for the whole server)
        self.server = grpc.aio.server(interceptors=interceptors, options=options,
                                      maximum_concurrent_rpcs=config.max_concurrent_calls)
        add_scoring_service(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        address = f"{config.host}:{config.port}"
        if config.token and not config.tls_cert and not is_loopback(config.host):
            log.warning("the bearer token crosses the network in plaintext on %s: anyone on the path can read "
                        "and replay it; serve TLS (--tls-cert/--tls-key) or listen on a loopback address",
                        config.host or "every interface")
        try:
            if config.tls_cert or config.tls_key:
                if not (config.tls_cert and config.tls_key):
                    raise ValueError("TLS needs both --tls-cert and --tls-key")
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind"
            raise OSError(f"cannot listen on {address} ({exc}): is the port in use? choose another --port") from None
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reload_task = asyncio.create_task(self._watch_models())
        log.info("scoring on %s:%d (%s%s), model %s, metrics %s", config.host, self.port,
                 "TLS" if config.tls_cert else "plaintext", ", bearer token" if config.token else "",
                 self.watcher.current.version,
                 f"http://{config.host}:{self.metrics_port}/metrics" if self.metrics_port else "off")

    async def _watch_models(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.reload_seconds)
            try:
                # loading runs on its own thread: calls keep being answered by the old model meanwhile
                if await loop.run_in_executor(None, self.watcher.check):
                    self.metrics.model_version(self.watcher.current.version)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad check
                log.exception("model check failed; still serving %s", self.watcher.current.version)

    async def stop(self, grace: float = 2.0) -> None:
        if self._reload_task:
            self._reload_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self._release()

    def _release(self) -> None:
        self.service.batcher.close()
        self.metrics.close()


@contextmanager
def serving_in_background(config: ServeConfig, store) -> Iterator[ScoringServer]:
    """A started server on an event loop of its own thread (tests, benchmarks, the quickstart);
    stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="scoring-server", daemon=True)
    thread.start()

    async def start() -> ScoringServer:
        server = ScoringServer(config, store)
        await server.start()
        return server

    server = None
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
        yield server
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def serve_forever(config: ServeConfig, store) -> None:
    import signal

    server = ScoringServer(config, store)
    await server.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    log.info("stopping")
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from features.store import StoreError, data_dir, open_store
    from recsys.export import ModelArtifactError

    parser = argparse.ArgumentParser(prog="plexrec serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True,
                        help="an exported model directory, or a root of versions (the newest is served and "
                             "newer ones are picked up)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--data-dir", help="the feature store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    parser.add_argument("--profile", default="local", choices=["local", "redis"])
    parser.add_argument("--redis-url", help="host:port of Redis for --profile redis")
    parser.add_argument("--max-candidates", type=int, default=1000)
    parser.add_argument("--max-batch-rows", type=int, default=4096,
                        help="concurrent calls share one forward of up to this many rows")
    parser.add_argument("--max-queued-rows", type=int, default=16384,
                        help="candidate rows that may wait for the model; a call past it is refused "
                             "RESOURCE_EXHAUSTED at once (at least --max-candidates)")
    parser.add_argument("--max-concurrent-calls", type=int, default=256,
                        help="calls in the server at once, health checks included; gRPC refuses the rest "
                             "RESOURCE_EXHAUSTED (0: no limit)")
    parser.add_argument("--item-cache-entries", type=int, default=DEFAULT_MAX_CACHED_ITEMS,
                        help="items whose features are cached, at most (least recently used evicted); "
                             "also the bound of the model's item vectors (serving/item_vectors.py): at least "
                             "--max-candidates and the store's history length; a batch of calls with more "
                             "distinct items is scored in pieces that fit")
    parser.add_argument("--item-cache-mib", type=float, default=DEFAULT_MAX_CACHED_BYTES / 2**20,
                        help="estimated memory of the item cache, at most, in MiB")
    parser.add_argument("--item-cache-seconds", type=float, default=60.0,
                        help="how long a cached item's features are used before they are read again")
    parser.add_argument("--reload-seconds", type=float, default=5.0, help="how often to look for a newer model")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads of the forward (measured on 2 cores: 1 beats 2, which fight "
                             "the gRPC and store threads; scale out with replicas)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--token-file", help="require 'authorization: Bearer <token>' with the token in this file "
                                             "(or set $PLEXREC_TOKEN)")
    args = parser.parse_args(argv)
    # force: importing fbgemm has already given the root logger a WARNING handler, which would swallow
    # every INFO line of the server (its address, model swaps)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    try:  # before anything loads: a server meant to be closed must not come up open
        token = read_token(args.token_file)
    except TokenError as exc:
        sys.exit(f"plexrec serve: {exc}")
    import torch

    torch.set_num_threads(args.torch_threads)
    config = ServeConfig(model_dir=args.model_dir, host=args.host, port=args.port, metrics_port=args.metrics_port,
                         max_candidates=args.max_candidates,
                         max_batch_rows=args.max_batch_rows, max_queued_rows=args.max_queued_rows,
                         max_concurrent_calls=args.max_concurrent_calls or None,
                         reload_seconds=args.reload_seconds, item_cache_seconds=args.item_cache_seconds,
                         item_cache_entries=args.item_cache_entries,
                         item_cache_bytes=int(args.item_cache_mib * 2**20),
                         tls_cert=args.tls_cert, tls_key=args.tls_key, token=token)
    try:
        store = open_store(args.profile, data_dir(args.data_dir), args.redis_url)
        asyncio.run(serve_forever(config, store))
    except (StoreError, ModelArtifactError, ValueError, OSError) as exc:
        sys.exit(f"plexrec serve: {exc}")


if __name__ == "__main__":
    main()
