"""The model batcher's admission by time (serving/batcher.py), on an event loop with a plain scorer:
what a batch costs is fitted from the batches seen, and a call that would wait past the time
target or its deadline is refused at once. (The row bound, batching and cancellation:
tests/test_serving.py::test_the_model_queue_refuses_calls_past_its_row_bound_and_batches_what_waits.)"""

import asyncio
import threading
import time

import pytest

from serving.batcher import INLINE_MAX_SECONDS, BatchCost, ModelBatcher, Overloaded, WouldMissDeadline

FIXED, PER_ROW = 0.001, 0.00001  # 1 ms a batch, 10 us a row


def test_the_batch_cost_is_fitted_to_the_batches_seen_and_follows_a_change():
    cost = BatchCost()
    assert not cost.known
    for rows in (100, 1000, 400, 100, 700):
        cost.observe(rows, FIXED + PER_ROW * rows)
    assert cost.line() == pytest.approx((FIXED, PER_ROW))
    assert cost(2000) == pytest.approx(FIXED + PER_ROW * 2000)
    assert cost.rows_within(0.010) == pytest.approx((0.010 - FIXED) / PER_ROW)
    for _ in range(200):  # the machine got twice as slow: the newest batches weigh most
        for rows in (100, 1000):
            cost.observe(rows, 2 * (FIXED + PER_ROW * rows))
    assert cost.line() == pytest.approx((2 * FIXED, 2 * PER_ROW), rel=1e-3)
    same_size = BatchCost()
    for _ in range(3):
        same_size.observe(500, 0.006)  # one size only: no line to fit, all of it per row
    assert same_size.line() == pytest.approx((0.0, 0.006 / 500))


def test_calls_that_would_wait_past_the_target_or_their_deadline_are_refused_at_once():
    """Cost known (1 ms + 10 us a row), a 10 ms target: a batch takes at most 900 rows (what it
    scores in 10 ms); 250-row calls submitted in one turn of the loop are admitted while the rows
    ahead of them take at most 10 ms to score, refused after, naming the flag; a call whose deadline
    comes before its scores would is refused naming the deadline; the admitted are scored in
    batches of at most 900 rows."""
    batches: list[list[str]] = []

    def score(model, requests):
        rows = sum(r for _, r in requests)
        time.sleep(FIXED + PER_ROW * rows)
        batches.append([name for name, _ in requests])
        return [name for name, _ in requests]

    async def scenario():
        batcher = ModelBatcher(score, max_rows=4000, max_queued_rows=100_000, max_wait=0.010)
        for rows in (100, 1000):
            batcher.cost.observe(rows, FIXED + PER_ROW * rows)
        assert batcher.batch_rows() == pytest.approx(900)
        with pytest.raises(WouldMissDeadline, match=r"scored in about 4 ms .*after its deadline \(3 ms\)"):
            batcher.submit("model", ("late", 300), 300, deadline=0.003)  # 1 ms + 300 x 10 us
        admitted, refused = [], []
        for n in range(8):
            try:
                admitted.append(batcher.submit("model", (f"c{n}", 250), 250, deadline=5.0))
            except Overloaded as exc:
                refused.append(str(exc))
        # ahead of each: 0 rows, 250 (3.5 ms), 500 (6 ms), 750 (8.5 ms); 1,000 are two batches (12 ms)
        assert len(admitted) == 4 and len(refused) == 4
        assert "would wait about 12 ms for the model (1000 rows queued), past the 10 ms target (--max-queue-ms)" \
            in refused[0]
        assert await asyncio.gather(*admitted) == [f"c{n}" for n in range(4)]
        assert batches == [["c0", "c1", "c2"], ["c3"]]  # at most 900 rows, not 4,000
        assert batcher.busy_until is None and batcher.queued_rows == 0
        batcher.close()

    asyncio.run(scenario())


def test_without_a_measured_batch_nothing_is_refused_for_time():
    async def scenario():
        batcher = ModelBatcher(lambda model, requests: [None] * len(requests), max_wait=0.001)
        calls = [batcher.submit("model", n, 1000, deadline=0.0005) for n in range(10)]
        assert len(calls) == 10  # the first batch is what teaches the cost
        await asyncio.gather(*calls)
        assert batcher.cost.known
        batcher.close()

    asyncio.run(scenario())


def test_a_lone_short_call_is_scored_on_the_loop_and_the_rest_on_the_model_thread():
    """A call alone, of a known short cost, is scored on the event loop's own thread (no hand-over);
    calls waiting together go to the model thread, so the loop keeps receiving while they are
    scored; so does a lone call of unknown or long cost, and, for INLINE_PAUSE_SECONDS, every call
    after a batch that failed (a slow or unreachable store must not stop the loop)."""
    threads: list[tuple[str, bool]] = []
    failing = set()

    def score(model, requests):
        threads.append(("+".join(requests), threading.current_thread() is threading.main_thread()))
        return [RuntimeError("store down") if r in failing else r for r in requests]

    async def scenario():
        batcher = ModelBatcher(score, max_rows=4000, max_queued_rows=100_000, max_wait=0.010)
        assert await batcher.submit("model", "unknown-cost", 10) == "unknown-cost"  # cost not known: thread
        batcher.cost = BatchCost()
        for rows in (100, 1000):
            batcher.cost.observe(rows, FIXED + PER_ROW * rows)
        assert await batcher.submit("model", "lone", 10) == "lone"
        together = [batcher.submit("model", name, 10) for name in ("a", "b", "c")]
        assert await asyncio.gather(*together) == ["a", "b", "c"]
        long_rows = int((INLINE_MAX_SECONDS - FIXED) / PER_ROW) + 100  # fitted cost past the bound
        assert await batcher.submit("model", "long", long_rows) == "long"
        failing.add("fails")
        with pytest.raises(RuntimeError, match="store down"):
            await batcher.submit("model", "fails", 10)
        assert await batcher.submit("model", "after-failure", 10) == "after-failure"
        assert batcher.inline_batches == 2  # "lone" and "fails"
        batcher.close()

    asyncio.run(scenario())
    assert threads == [("unknown-cost", False), ("lone", True), ("a+b+c", False), ("long", False),
                       ("fails", True), ("after-failure", False)]
