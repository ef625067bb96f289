"""Concurrent scoring calls share one batch: one store read, one set of model inputs, one forward.

Calls wait in ``pending`` on the event loop. One model thread scores a batch at a
time (``score``: fetch, inputs, forward, all on that thread); whatever arrived while
it worked is the next batch, up to a row budget. So batches grow with the load by
themselves, and at concurrency 1 a call waits for nobody.

Why this shape: the event loop, the model's work and the store reads share one GIL,
and every hand-over between threads waits for it. Until 2026-12-01 each call made
two of them (a store-read pool, then the model thread) and each stage cost about
twice its in-process time. Now a batch makes one hop there and back. Scoring on the
loop itself (tried) makes no hop, but then the loop stops taking new calls while it
scores: gRPC lets in one call per turn of the loop, so batches stayed at 1-3 calls
and throughput fell (bench/serving.py, both measured in one session).

Admission is by time. An unbounded queue only turns overload into latency: every call
waits behind the backlog until all of them miss their deadlines, while the server keeps
spending forwards on calls nobody waits for any more. A bound in rows (``max_queued_rows``,
kept as a memory bound) protects the process but not the latency: 16k rows of 1,000-candidate
calls are 2 s of work. So the batcher measures what a batch costs on the model thread
(``BatchCost``: seconds = fixed + per row x rows, fitted to the recent batches) and ``submit``
refuses at once (``Overloaded``) a call that would wait longer than ``max_wait`` seconds
(``--max-queue-ms``) before its batch starts, or that would be scored after its own deadline.
A batch takes calls only up to the rows it can score within ``max_wait`` too (at least one
call), so an admitted call's latency is bounded by about twice the target, not by the queue.

A lone call is scored on the loop itself. When one call waits and the model thread is idle, nothing
overlaps the hop anyway, and the hop is not free: handing the batch over and the answer back, each
thread waking and taking the GIL from the other, made every stage cost 1.5-1.8x its in-process time
at concurrency 1; scoring it on the loop took the p50 from 6.1 to 4.9 ms (100 candidates) and
14.4 to 10.8 ms (1,000) in an A/B of the two servers (docs/benchmarks.md "Serving"). Only a short batch
(fitted cost at most ``INLINE_MAX_SECONDS``) whose last batches neither failed nor overran goes
inline: the loop stops answering anything while it scores, so a cold cache or a slow or unreachable
store (whose reads retry with pauses) must not run there. Two or more calls waiting go to the
thread as before, so that under load the loop keeps receiving while the model works.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("plexrec.serving.batcher")

INLINE_MAX_SECONDS = 0.020  # the longest the event loop may stop for a lone call's batch (fitted cost)
INLINE_PAUSE_SECONDS = 5.0  # after a batch that failed or overran, lone calls go to the thread for this long

# score(model, requests) -> one result per request, in order: a value, or an exception that fails that
# call alone; raising fails every call of the batch. Runs on the model thread (a lone call: on the loop).
ScoreBatch = Callable[[Any, list[Any]], list[Any]]


@dataclass
class WaitingCall:
    model: Any  # the ServingModel the call was admitted under: one call, one model
    request: Any  # whatever ``score`` reads of the call
    rows: int
    future: asyncio.Future
    counted: bool = True  # its rows are in ``queued_rows``


class Overloaded(Exception):
    """The model queue has no room for a call; the message says how full it is."""


class WouldMissDeadline(Overloaded):
    """A call would be scored after its deadline: refused at once rather than scored for nobody (the
    server answers DEADLINE_EXCEEDED, which the caller would see anyway, not "overloaded": an idle
    server refuses a deadline shorter than one call's cost too)."""


class BatchCost:
    """Seconds a batch of ``rows`` takes on the model thread, ``fixed + per_row * rows``, fitted by
    exponentially weighted least squares to the batches seen (the newest weigh most: a reloaded
    model, a warmer cache or a busier machine shift it within tens of batches)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.weight = self.rows = self.seconds = self.rows_squared = self.rows_seconds = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.weight = d * self.weight + 1
        self.rows = d * self.rows + rows
        self.seconds = d * self.seconds + seconds
        self.rows_squared = d * self.rows_squared + rows * rows
        self.rows_seconds = d * self.rows_seconds + rows * seconds

    @property
    def known(self) -> bool:
        return self.weight > 0

    def line(self) -> tuple[float, float]:
        """(fixed seconds per batch, seconds per row)."""
        spread = self.weight * self.rows_squared - self.rows ** 2
        if spread > 1e-9 * max(self.weight * self.rows_squared, 1.0):
            per_row = (self.weight * self.rows_seconds - self.rows * self.seconds) / spread
            fixed = (self.seconds - per_row * self.rows) / self.weight
            if per_row >= 0 and fixed >= 0:
                return fixed, per_row
        # every batch of one size so far (or a fit off its rails): all of it per row
        return 0.0, self.seconds / max(self.rows, 1.0)

    def __call__(self, rows: int) -> float:
        fixed, per_row = self.line()
        return fixed + per_row * rows

    def rows_within(self, seconds: float) -> float:
        """The rows one batch can score in ``seconds``."""
        fixed, per_row = self.line()
        return math.inf if per_row <= 0 else max(seconds - fixed, 0.0) / per_row


class ModelBatcher:
    def __init__(self, score: ScoreBatch, max_rows: int = 4096, max_queued_rows: int = 16384,
                 max_wait: float | None = None) -> None:
        """``max_wait``: seconds a call may wait for its batch to start (None: no time target; the
        deadline of ``submit`` still counts)."""
        self.score, self.max_rows, self.max_queued_rows = score, max_rows, max_queued_rows
        self.max_wait = max_wait
        self.pending: deque[WaitingCall] = deque()
        self.queued_rows = 0  # rows of the calls waiting (not of the batch being scored, nor of abandoned ones)
        self.batches = 0
        self.cost = BatchCost()
        self.busy_until: float | None = None  # when the batch being scored should end (time.monotonic)
        self.inline_after = 0.0  # no batch on the loop before this time (time.monotonic)
        self.inline_batches = 0  # batches scored on the loop itself
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._runner: asyncio.Task | None = None

    def check_room(self, rows: int) -> None:
        """Overloaded unless a call of ``rows`` fits in the queue now."""
        if self.queued_rows + rows > self.max_queued_rows:
            raise Overloaded(f"{self.queued_rows} rows wait for the model, a call of {rows} more would pass the "
                             f"queue's {self.max_queued_rows} (--max-queued-rows)")

    def batch_rows(self) -> float:
        """The rows one batch takes: ``max_rows``, fewer where a batch that big would outlast ``max_wait``."""
        if self.max_wait is None or not self.cost.known:
            return self.max_rows
        return min(self.max_rows, self.cost.rows_within(self.max_wait))

    def expected_wait(self, rows: int) -> tuple[float, float]:
        """(seconds until a call of ``rows`` submitted now starts being scored, seconds until it is
        scored): the rest of the batch in progress, then the rows queued ahead of it, scored in
        batches of ``batch_rows``; then its own."""
        if not self.cost.known:
            return 0.0, 0.0
        fixed, per_row = self.cost.line()
        in_progress = max(0.0, self.busy_until - time.monotonic()) if self.busy_until is not None else 0.0
        ahead = math.ceil(self.queued_rows / max(self.batch_rows(), 1.0))
        starts = in_progress + ahead * fixed + self.queued_rows * per_row
        return starts, starts + fixed + rows * per_row

    def check_time(self, rows: int, deadline: float | None) -> None:
        """Overloaded if a call of ``rows`` would wait past ``max_wait``, or be scored after its
        ``deadline`` (seconds from now; None: none)."""
        if self.max_wait is None and deadline is None:
            return
        starts, done = self.expected_wait(rows)
        if self.max_wait is not None and starts > self.max_wait:
            raise Overloaded(f"a call of {rows} rows would wait about {starts * 1000:.0f} ms for the model "
                             f"({self.queued_rows} rows queued), past the {self.max_wait * 1000:.0f} ms target "
                             f"(--max-queue-ms)")
        if deadline is not None and done > deadline:
            raise WouldMissDeadline(f"a call of {rows} rows would be scored in about {done * 1000:.0f} ms "
                             f"({self.queued_rows} rows queued), after its deadline ({deadline * 1000:.0f} ms)")

    def submit(self, model, request, rows: int, deadline: float | None = None) -> asyncio.Future:
        """A future of ``score``'s result for this call; Overloaded at once when the queue has no room,
        or the call would wait too long (``check_time``). Called on the event loop."""
        self.check_room(rows)
        self.check_time(rows, deadline)
        loop = asyncio.get_running_loop()
        call = WaitingCall(model, request, rows, loop.create_future())
        self.pending.append(call)
        self.queued_rows += rows
        # a caller that gives up (deadline, disconnect) frees its room at once, not when its turn comes:
        # else abandoned calls fill the queue while a long batch is scored and live ones are refused
        call.future.add_done_callback(lambda future: self._uncount(call) if future.cancelled() else None)
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        return call.future

    def scores_inline(self, calls: int, rows: int) -> bool:
        """Whether the next batch (``calls`` calls, ``rows`` rows) is scored on the event loop: a lone
        call with nobody else waiting, of a known short cost, while no recent batch failed or overran."""
        return (calls == 1 and not self.pending and self.cost.known and self.cost(rows) <= INLINE_MAX_SECONDS
                and time.monotonic() >= self.inline_after)

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[WaitingCall]:
        """The next calls to score together: at least one, then up to ``batch_rows`` rows. A call
        cancelled while it waited (its deadline passed, its client left) is dropped: scoring it is
        wasted work."""
        taken: list[WaitingCall] = []
        rows, bound = 0, self.batch_rows()
        while self.pending and (not taken or rows + self.pending[0].rows <= bound):
            call = self.pending.popleft()
            self._uncount(call)
            if not call.future.cancelled():
                taken.append(call)
                rows += call.rows
        return taken

    def _uncount(self, call: WaitingCall) -> None:
        if call.counted:
            call.counted = False
            self.queued_rows -= call.rows

    async def _run(self) -> None:
        """Batches until nobody waits; the next call starts a new runner."""
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                by_model: dict[int, list[WaitingCall]] = {}  # a reload between two admissions splits them
                for call in self._take():
                    by_model.setdefault(id(call.model), []).append(call)
                for calls in by_model.values():
                    self.batches += 1
                    rows = sum(call.rows for call in calls)
                    inline = self.scores_inline(len(calls), rows)
                    started = time.monotonic()
                    self.busy_until = started + (self.cost(rows) if self.cost.known else 0.0)
                    requests = [call.request for call in calls]
                    try:
                        if inline:
                            self.inline_batches += 1
                            results = self.score(calls[0].model, requests)
                        else:
                            results = await loop.run_in_executor(self._model_thread, self.score, calls[0].model,
                                                                 requests)
                    except Exception as exc:  # noqa: BLE001 - every waiting call must hear about it
                        log.exception("scoring a batch of %d calls failed", len(calls))
                        results = [exc] * len(calls)
                        self.inline_after = time.monotonic() + INLINE_PAUSE_SECONDS
                    else:  # a failed batch (a store outage, say) says nothing of what scoring costs
                        elapsed = time.monotonic() - started
                        if elapsed > INLINE_MAX_SECONDS or any(isinstance(r, BaseException) for r in results):
                            self.inline_after = time.monotonic() + INLINE_PAUSE_SECONDS
                        self.cost.observe(rows, elapsed)
                    self.busy_until = None
                    for call, result in zip(calls, results):
                        if call.future.done():  # cancelled while its batch was scored
                            continue
                        if isinstance(result, BaseException):
                            call.future.set_exception(result)
                        else:
                            call.future.set_result(result)
        finally:
            self._runner = None
