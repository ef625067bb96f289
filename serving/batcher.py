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

The queue is bounded in rows (``max_queued_rows``): past it ``submit`` raises
``Overloaded`` at once. An unbounded queue only turns overload into latency: every
call waits behind the backlog until all of them miss their deadlines, while the
server keeps spending forwards on calls nobody waits for any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("plexrec.serving.batcher")

# score(model, requests) -> one result per request, in order: a value, or an exception that fails that
# call alone; raising fails every call of the batch. Runs on the model thread.
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


class ModelBatcher:
    def __init__(self, score: ScoreBatch, max_rows: int = 4096, max_queued_rows: int = 16384) -> None:
        self.score, self.max_rows, self.max_queued_rows = score, max_rows, max_queued_rows
        self.pending: deque[WaitingCall] = deque()
        self.queued_rows = 0  # rows of the calls waiting (not of the batch being scored, nor of abandoned ones)
        self.batches = 0
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._runner: asyncio.Task | None = None

    def check_room(self, rows: int) -> None:
        """Overloaded unless a call of ``rows`` fits in the queue now."""
        if self.queued_rows + rows > self.max_queued_rows:
            raise Overloaded(f"{self.queued_rows} rows wait for the model, a call of {rows} more would pass the "
                             f"queue's {self.max_queued_rows} (--max-queued-rows)")

    def submit(self, model, request, rows: int) -> asyncio.Future:
        """A future of ``score``'s result for this call; Overloaded at once when the queue has no room.
        Called on the event loop."""
        self.check_room(rows)
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

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[WaitingCall]:
        """The next calls to score together: at least one, then up to ``max_rows`` rows. A call
        cancelled while it waited (its deadline passed, its client left) is dropped: scoring it is
        wasted work."""
        taken: list[WaitingCall] = []
        rows = 0
        while self.pending and (not taken or rows + self.pending[0].rows <= self.max_rows):
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
                    try:
                        results = await loop.run_in_executor(self._model_thread, self.score, calls[0].model,
                                                             [call.request for call in calls])
                    except Exception as exc:  # noqa: BLE001 - every waiting call must hear about it
                        log.exception("scoring a batch of %d calls failed", len(calls))
                        results = [exc] * len(calls)
                    for call, result in zip(calls, results):
                        if call.future.done():  # cancelled while its batch was scored
                            continue
                        if isinstance(result, BaseException):
                            call.future.set_exception(result)
                        else:
                            call.future.set_result(result)
        finally:
            self._runner = None
