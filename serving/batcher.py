"""Concurrent scoring calls share one forward: a single model thread takes whatever calls
are waiting, up to a row budget, and scores them as one batch.

Why: the model costs far less per row in a big batch (on this 2-core machine one
forward of 1,000 rows took about 3x one of 100), and forwards of several threads at
once only fight over the cores. At concurrency 1 a call waits for nobody.

The queue is bounded in rows (``max_queued_rows``): past it ``submit`` raises
``Overloaded`` at once. An unbounded queue only turns overload into latency: every
call waits behind the backlog until all of them miss their deadlines, while the
server keeps spending forwards on calls nobody waits for any more.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from features.online import ItemFeatures, UserFeatures
from serving.model import ServingModel

log = logging.getLogger("plexrec.serving.batcher")


@dataclass
class ScoringJob:
    model: ServingModel
    user: UserFeatures
    items: list[ItemFeatures]
    history_items: dict[int, ItemFeatures]
    future: Future | asyncio.Future = field(default_factory=Future)
    loop: asyncio.AbstractEventLoop | None = None  # set: ``future`` is an asyncio future of this loop

    def wanted(self) -> bool:
        """False when the caller gave up (cancelled: deadline passed, client left) while it waited."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()  # read from this thread: a hint, _deliver checks again


def _deliver(outcomes: list[tuple[asyncio.Future, tuple | None, BaseException | None]]) -> None:
    """On the event loop: settle the futures of one batch's calls (one wake-up of the loop for all)."""
    for future, result, error in outcomes:
        if future.done():  # cancelled after the model thread looked
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


@dataclass
class BatchTiming:
    model_inputs: float  # seconds building the shared batch
    forward: float
    requests: int
    rows: int


class Overloaded(Exception):
    """The model queue has no room for a call; the message says how full it is."""


class ModelBatcher:
    def __init__(self, max_rows: int = 4096, max_queued_rows: int = 16384) -> None:
        self.max_rows, self.max_queued_rows = max_rows, max_queued_rows
        self.jobs: queue.Queue[ScoringJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self.queued_rows = 0  # rows of the calls waiting for the model thread (not the batch it is scoring)
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.thread.start()

    def check_room(self, rows: int) -> None:
        """Overloaded unless a call of ``rows`` would fit in the queue now (a cheap look before the
        call spends a store read; ``submit`` decides)."""
        if self.queued_rows + rows > self.max_queued_rows:
            raise self._overloaded(rows)

    def submit(self, model: ServingModel, user: UserFeatures, items: list[ItemFeatures],
               history_items: dict[int, ItemFeatures], loop: asyncio.AbstractEventLoop | None = None):
        """A future of (probabilities, BatchTiming); Overloaded when the queue has no room. Given
        ``loop``, an asyncio future of it: the calls of one batch are then settled with one wake-up of
        the loop (a concurrent future wakes it once per call: a tenth of the server's time at
        concurrency 8, measured)."""
        future = loop.create_future() if loop is not None else Future()
        job = ScoringJob(model, user, items, history_items, future, loop)
        with self._lock:
            if self.queued_rows + len(items) > self.max_queued_rows:
                raise self._overloaded(len(items))
            self.queued_rows += len(items)
        self.jobs.put(job)
        return job.future

    def _overloaded(self, rows: int) -> Overloaded:
        return Overloaded(f"{self.queued_rows} rows wait for the model, a call of {rows} more would pass the "
                          f"queue's {self.max_queued_rows} (--max-queued-rows)")

    def _dequeued(self, job: ScoringJob) -> None:
        with self._lock:
            self.queued_rows -= len(job.items)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _take(self) -> list[ScoringJob] | None:
        """The next calls to score together (at least one), or None to stop. A call cancelled
        while it waited (its deadline passed, its client left) is dropped here: scoring it is
        wasted work, and setting its result would fail the calls batched with it."""
        taken: list[ScoringJob] = []
        rows = 0
        while not taken or rows < self.max_rows:
            try:
                job = self.jobs.get() if not taken else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                if taken:
                    self.jobs.put(None)  # finish this batch, then stop
                    break
                return None
            self._dequeued(job)
            if job.wanted():
                taken.append(job)
                rows += len(job.items)
        return taken

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            # one forward per model: a reload between two calls' fetches splits them
            by_model: dict[int, list[ScoringJob]] = {}
            for job in taken:
                by_model.setdefault(id(job.model), []).append(job)
            for jobs in by_model.values():
                self._score(jobs)

    def _score(self, jobs: list[ScoringJob]) -> None:
        try:
            model = jobs[0].model
            history_items = {k: v for job in jobs for k, v in job.history_items.items()}
            started = time.perf_counter()
            inputs = model.batch([(job.user, job.items) for job in jobs], history_items)
            built = time.perf_counter()
            scores = model.probabilities(inputs)
            timing = BatchTiming(built - started, time.perf_counter() - built, len(jobs), len(scores))
        except Exception as exc:  # noqa: BLE001 - every waiting call must hear about it
            log.exception("scoring a batch of %d calls failed", len(jobs))
            self._settle(jobs, [None] * len(jobs), exc)
            return
        bounds = np.cumsum([0] + [len(job.items) for job in jobs])
        self._settle(jobs, [(scores[start:end], timing) for start, end in zip(bounds[:-1], bounds[1:])], None)

    @staticmethod
    def _settle(jobs: list[ScoringJob], results: list, error: BaseException | None) -> None:
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for job, result in zip(jobs, results):
            if job.loop is None:
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
            else:
                by_loop.setdefault(id(job.loop), (job.loop, []))[1].append((job.future, result, error))
        for loop, outcomes in by_loop.values():
            try:
                loop.call_soon_threadsafe(_deliver, outcomes)
            except RuntimeError:  # the loop closed (server stopping): nobody waits for these
                pass
