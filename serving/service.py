"""The Scoring service: what one call does, and what one batch of calls does on the model thread
(a lone call's batch: on the event loop, serving/batcher.py).

Per call: validate the request (serving/requests.py), parse its context, submit it to the batcher
(serving/batcher.py), answer the scores or a status. Per batch: one online-store read of every
call's user and candidates (through the item cache, features/online.py), one set of model
inputs by training's rules (serving/inputs.py), one forward on the served version
(serving/model.py). The server around it (serving/server.py) owns ports, TLS, health and reloads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from features.online import OnlineFeatures
from features.store import StoreError
from protos.plexrec.v1 import scoring_pb2, scoring_pb2_grpc
from serving.batcher import ModelBatcher, Overloaded, WouldMissDeadline
from serving.config import ServeConfig
from serving.inputs import InvalidContext, request_context
from serving.metrics import ServingMetrics
from serving.model import ModelWatcher
from serving.requests import InvalidRequest, UndecodableRequest, tolerant_parser, validate

log = logging.getLogger("plexrec.serving")

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
SHED_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)  # load, not a fault
SHED_LOG_SECONDS = 10.0


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


@dataclass
class ScoringCall:
    """One admitted call as the batcher hands it to ``ScoringService.score_batch``."""

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
        self.shed: dict[str, int] = {}  # calls shed since the last calls_shed log line, by code
        self.shed_logged, self.last_shed = time.monotonic() - SHED_LOG_SECONDS, ""  # the first is logged at once
        self.batcher = ModelBatcher(self.score_batch, config.max_batch_rows, config.max_queued_rows,
                                    None if config.max_queue_ms is None else config.max_queue_ms / 1000)

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

    def _log_shed(self, code: grpc.StatusCode, message: str) -> None:
        """Calls shed under load are counted (plexrec_errors_total) and logged as one line per
        SHED_LOG_SECONDS, not one each: under overload a line per refused call costs the server as much
        as refusing it, and drowns every other line."""
        self.shed[code.name] = self.shed.get(code.name, 0) + 1
        self.last_shed = message
        if time.monotonic() - self.shed_logged >= SHED_LOG_SECONDS:
            self.log_shed_calls()

    def log_shed_calls(self) -> None:
        """The calls shed since the last such line, if any (also when the server stops)."""
        now = time.monotonic()
        if self.shed:
            log.warning(json.dumps({"event": "calls_shed", "seconds": round(now - self.shed_logged, 1),
                                    "counts": self.shed, "last": self.last_shed}))
        self.shed, self.shed_logged = {}, now

    async def _scores(self, method: str, request, context) -> tuple[np.ndarray, str]:
        started = time.perf_counter()
        self.metrics.calls.labels(method).inc()
        try:
            validate(request, self.config.max_candidates)
            call = ScoringCall(request, request_context(self.online.schema, request.context), context)
            model = self.watcher.current  # one read: this call uses one model from start to end
            scores, timing = await self.batcher.submit(model, call, len(request.item_ids), context.time_remaining())
            if context.time_remaining() == 0:  # scored too late: no one waits for the answer any more
                raise DeadlineExpired()
        except (InvalidRequest, InvalidContext) as exc:
            await self._fail(method, request, context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except DeadlineExpired:
            await self._fail(method, request, context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             "the deadline passed before the scores were ready")
        except WouldMissDeadline as exc:
            await self._fail(method, request, context, grpc.StatusCode.DEADLINE_EXCEEDED, f"refused at once: {exc}")
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
        item = items.__getitem__
        candidates = [list(map(item, call.request.item_ids)) for call in calls]
        return users, candidates, dict(zip(history_ids, map(item, history_ids)))

    async def _fail(self, method: str, request, context, code: grpc.StatusCode, message: str) -> None:
        self.metrics.errors.labels(method, code.name).inc()
        if code in SHED_CODES:
            self._log_shed(code, message)
        else:
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
    return isinstance(exc, StoreError)
