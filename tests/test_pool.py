"""The worker pool: concurrency up to its size for items that wait, one worker for a burst that does not."""

from __future__ import annotations

import asyncio

from runtime.pool import WorkerPool


async def test_items_that_wait_run_side_by_side_up_to_the_size() -> None:
    running = peak = 0
    release = asyncio.Event()

    async def wait(_: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    pool: WorkerPool[int] = WorkerPool(wait, 8)
    for i in range(20):
        pool.submit(i)
    for _ in range(50):   # a few loop iterations: the pool fans out once its workers wait
        await asyncio.sleep(0)
    assert peak == 8 and pool.busy == 20
    release.set()
    assert await pool.join(5)
    assert pool.busy == 0 and peak == 8
    await pool.cancel()


async def test_a_burst_that_never_waits_runs_in_one_worker() -> None:
    done: list[int] = []

    async def quick(i: int) -> None:
        done.append(i)

    pool: WorkerPool[int] = WorkerPool(quick, 512)
    for burst in range(5):
        for i in range(100):
            pool.submit(burst * 100 + i)
        assert await pool.join(5)
    assert done == list(range(500))
    assert len(pool._workers) == 1   # no task woken per item only to find the queue empty
    await pool.cancel()


async def test_join_times_out_while_an_item_runs() -> None:
    async def forever(_: int) -> None:
        await asyncio.Event().wait()

    pool: WorkerPool[int] = WorkerPool(forever, 2)
    pool.submit(1)
    assert not await pool.join(0.05)
    await pool.cancel()
    pool.submit(2)   # usable again after a cancel
    assert not await pool.join(0.05)
    await pool.cancel()


async def test_cancel_ends_a_worker_whose_item_swallowed_the_cancellation() -> None:
    """An item that catches its cancellation and returns (a careless handler) must not keep
    ``cancel()`` waiting: its worker stops all the same."""
    started = asyncio.Event()
    swallowed: list[int] = []

    async def stubborn(i: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append(i)

    pool: WorkerPool[int] = WorkerPool(stubborn, 2)
    pool.submit(1)
    await asyncio.wait_for(started.wait(), 5)
    cancelling = asyncio.ensure_future(pool.cancel())
    # Not wait_for: cancelling cancel() on a timeout would end the worker too, and hide the hang.
    done, _ = await asyncio.wait([cancelling], timeout=2)
    assert done, "cancel() still waits for the worker"
    assert swallowed == [1] and not pool._workers


async def test_a_long_burst_lets_the_loop_run_as_it_goes() -> None:
    # The connection writes acks, and the next pull request goes out, only when the loop runs:
    # a burst of handlers that never wait must not hold it until the whole burst is done.
    done: list[int] = []
    seen_midway: list[int] = []

    async def quick(i: int) -> None:
        done.append(i)

    async def watcher() -> None:
        while len(done) < 200:
            seen_midway.append(len(done))
            await asyncio.sleep(0)

    pool: WorkerPool[int] = WorkerPool(quick, 512)
    for i in range(200):
        pool.submit(i)
    watching = asyncio.create_task(watcher())
    assert await pool.join(5)
    await watching
    assert done == list(range(200))
    assert any(0 < n < 200 for n in seen_midway)   # it ran while the burst was under way
    assert len(pool._workers) == 1                 # and the burst still ran in one worker
    await pool.cancel()
