"""Priority levels: a free slot starts an invocation of the most urgent level queued, across runtimes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.client import Client
from runtime.manifest import FunctionManifest
from runtime.streams import INVOKE_STREAM, ensure_consumer, invoke_consumers, provision_base
from runtime.testing import call

from .conftest import collect, eventually

RANKED = """
    name: ranked
    handler: tests.handlers.priorities:tracked
    concurrency: {concurrency}
    timeout: 10s
"""


def level(subject: str) -> int:
    """The level an invocation subject queued at (5, the default, for the plain subject)."""
    tail = subject.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else 5


class Starts:
    """The start and end events of ``ranked``, in the order the server received them."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    @property
    def starts(self) -> list[int]:
        return [level(m.data.decode().split()[0]) for m in self.events if m.subject == "prio.start"]

    @property
    def ends(self) -> int:
        return sum(m.subject == "prio.end" for m in self.events)

    def most_at_once(self) -> int:
        running = peak = 0
        for m in self.events:
            running += 1 if m.subject == "prio.start" else -1
            peak = max(peak, running)
        return peak


async def publish_levels(js: JetStreamContext, lvl: int | None, count: int, seconds: float = 0.0,
                         first: int = 0) -> None:
    subject = "fn.invoke.ranked" if lvl is None else f"fn.invoke.ranked.{lvl}"
    for chunk in range(first, first + count, 100):
        await asyncio.gather(*(js.publish(subject, b'{"i": %d, "seconds": %g}' % (i, seconds))
                               for i in range(chunk, min(chunk + 100, first + count))))


def assert_urgent_first(starts: list[int], low_started_before: int) -> None:
    """Every level-10 start comes before any further level-1 start, beyond those already running."""
    first_high = starts.index(10)
    last_high = len(starts) - 1 - starts[::-1].index(10)
    between = [s for s in starts[first_high:last_high + 1] if s != 10]
    assert between == [], f"level-1 invocations started while level-10 ones were queued: {starts}"
    late_low = starts[:first_high].count(1) - low_started_before
    assert late_low <= 1, f"{late_low} level-1 invocations started after the level-10 ones were queued"


async def provision(js: JetStreamContext, concurrency: int) -> None:
    await provision_base(js)
    await ensure_consumer(js, FunctionManifest(name="ranked", handler="tests.handlers.priorities:tracked",
                                               concurrency=concurrency, timeout=10.0))


async def test_queued_invocations_start_by_level_then_in_order(nc: NATS, js: JetStreamContext,
                                                               runtime: Any) -> None:
    await provision(js, 1)
    await publish_levels(js, 1, 10)
    await publish_levels(js, None, 10, first=100)       # the plain subject: the default level, 5
    await publish_levels(js, 10, 10, first=200)
    events, _ = await collect(nc, "prio.>")
    await runtime(ranked=RANKED.format(concurrency=1))
    seen = Starts(events)
    await eventually(lambda: seen.ends == 30, timeout=20, message="all 30 ran")
    assert seen.starts == [10] * 10 + [5] * 10 + [1] * 10
    order = [int(m.data.decode().split()[1]) for m in events if m.subject == "prio.start"]
    assert order == list(range(200, 210)) + list(range(100, 110)) + list(range(10)), "FIFO within a level"


async def test_urgent_work_overtakes_a_long_queue_on_one_runtime(nc: NATS, js: JetStreamContext,
                                                                 runtime: Any) -> None:
    await provision(js, 1)
    events, _ = await collect(nc, "prio.>")
    await runtime(ranked=RANKED.format(concurrency=1))
    seen = Starts(events)
    await publish_levels(js, 1, 200, seconds=0.01)
    await eventually(lambda: len(seen.starts) >= 5, message="level-1 work running")
    await publish_levels(js, 10, 20, seconds=0.01, first=1000)
    low_before = seen.starts.count(1)
    await eventually(lambda: seen.ends == 220, timeout=30, message="all 220 ran")
    assert_urgent_first(seen.starts, low_before)
    assert seen.most_at_once() == 1


async def test_urgent_work_overtakes_across_two_runtimes_within_the_fleet_wide_concurrency(
        nc: NATS, js: JetStreamContext, manifest_dir: Callable[..., Path],
        runtime_process: Callable[..., Any]) -> None:
    await provision(js, 2)
    directory = manifest_dir(ranked=RANKED.format(concurrency=2))
    procs = [runtime_process(directory) for _ in range(2)]
    for proc in procs:
        await proc.wait_ready()
    events, _ = await collect(nc, "prio.>")
    seen = Starts(events)
    await publish_levels(js, 1, 200, seconds=0.02)
    await eventually(lambda: len(seen.starts) >= 10, message="level-1 work running")
    await publish_levels(js, 10, 20, seconds=0.02, first=1000)
    low_before = seen.starts.count(1)
    await eventually(lambda: seen.ends == 220, timeout=40, message="all 220 ran")
    # Two slots: up to one more level-1 invocation may already have been fetched for the other slot.
    first_high = seen.starts.index(10)
    assert seen.starts[:first_high].count(1) - low_before <= 2
    last_high = len(seen.starts) - 1 - seen.starts[::-1].index(10)
    assert seen.starts[first_high:last_high + 1].count(1) <= 1, seen.starts
    assert seen.most_at_once() <= 2, "concurrency 2 bounds both runtimes together, across levels"
    assert seen.most_at_once() == 2
    for proc in procs:
        assert "serving ranked" in proc.output()


async def test_client_and_raw_publishers_choose_the_level(nc: NATS, js: JetStreamContext, runtime: Any) -> None:
    await provision(js, 1)
    await publish_levels(js, 3, 3)
    async with Client(nc) as fn:
        call = await fn.submit("ranked", {"i": 50}, priority=9)
        assert not call.duplicate
        events, _ = await collect(nc, "prio.>")
        await runtime(ranked=RANKED.format(concurrency=1))
        seen = Starts(events)
        assert await fn.invoke("ranked", {"i": 60}, priority=1, timeout=10) == {"i": 60}
        await eventually(lambda: seen.ends == 5)
        assert seen.starts[0] == 9
        assert await fn.result(call.id, wait=5) == {"i": 50}
        try:
            await fn.submit("ranked", {}, priority=11)
        except ValueError as exc:
            assert "from 1 (least urgent) to 10 (most urgent)" in str(exc)
        else:
            raise AssertionError("level 11 was accepted")

    async def nothing_left() -> bool:   # the last call is acked just after its answer went out
        return (await js.stream_info(INVOKE_STREAM)).state.messages == 0

    await eventually(nothing_left, timeout=5, message="nothing left behind at any level")


async def test_ls_shows_what_waits_per_level(nc: NATS, js: JetStreamContext, runtime: Any,
                                             nats_server: Any) -> None:
    events, _ = await collect(nc, "prio.>")
    await runtime(ranked=RANKED.format(concurrency=1))
    seen = Starts(events)
    # Runs, holding the only slot, for longer than two `runtime ls` processes take to start on a
    # busy machine: the counts below must not move meanwhile.
    await publish_levels(js, None, 1, seconds=8)
    await eventually(lambda: len(seen.starts) == 1)
    await publish_levels(js, 10, 3, seconds=0)
    await publish_levels(js, 1, 2, seconds=0)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", "ls", "--json",
                                                    "--server", nats_server.url],
                                   capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    [row] = [r for r in json.loads(done.stdout) if r["name"] == "ranked"]
    assert (row["queued"], row["in_flight"], row["delayed"]) == (5, 1, 0)
    assert row["levels"] == {"10": 3, "5": 1, "1": 2}
    assert "priority=5" in row["settings"]
    table = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", "ls", "--server",
                                                     nats_server.url], capture_output=True, text=True, timeout=30)
    assert "5 (10:3 5:1 1:2)" in table.stdout


async def test_fn_call_requests_choose_their_level_with_a_header(nc: NATS, js: JetStreamContext,
                                                                 runtime: Any) -> None:
    events, _ = await collect(nc, "prio.>")
    await runtime(ranked=RANKED.format(concurrency=1))
    seen = Starts(events)
    reply = await nc.request("fn.call.ranked", b'{"i": 1}', timeout=10, headers={"Fn-Priority": "8"})
    assert json.loads(reply.data) == {"i": 1}
    await eventually(lambda: seen.starts == [8])
    refused = await nc.request("fn.call.ranked", b'{"i": 2}', timeout=10, headers={"Fn-Priority": "urgent"})
    assert refused.headers is not None and refused.headers["Nats-Service-Error-Code"] == "400"
    assert "Fn-Priority: 'urgent' is not a priority level from 1" in refused.headers["Nats-Service-Error"]
    assert seen.starts == [8], "a refused request runs nowhere"


def test_a_handler_queues_other_functions_at_a_level() -> None:
    out = call("tests.handlers.priorities:relay", {"to": "ranked", "priority": 9, "i": 3})
    assert [m.subject for m in out.invoked] == ["fn.invoke.ranked.9"]
    assert call("tests.handlers.priorities:relay", {"to": "ranked"}).invoked[0].subject == "fn.invoke.ranked"


async def test_a_handler_hears_of_a_full_queue_as_queue_full(nc: NATS, js: JetStreamContext, runtime: Any) -> None:
    await runtime(settings={"max_queued": 1}, relay="""
        name: relay
        handler: tests.handlers.priorities:relay
    """)
    await js.publish("fn.invoke.parked.2", b"{}")        # nothing serves it: its level-2 queue stays full
    async with Client(nc) as fn:
        assert await fn.invoke("relay", {"to": "parked", "priority": 2}, timeout=10) == {"full": 429}
        # Level 9 for the relay itself: with a limit of 1, its first call may still be held at level 5.
        assert "seq" in await fn.invoke("relay", {"to": "parked", "priority": 3}, timeout=10, priority=9)


async def test_calls_after_the_queue_ran_dry_start_at_once(nc: NATS, js: JetStreamContext, runtime: Any) -> None:
    """Each call finds its level drained (listened to, being listened to, or lingering): its
    doorbell or an open request starts it, never the periodic look seconds later."""
    await provision(js, 2)
    await runtime(ranked=RANKED.format(concurrency=2))
    pauses = [0.0, 0.001, 0.005, 0.015, 0.025, 0.06, 0.12]   # around LINGER and RING_SETTLE
    slowest = 0.0
    async with Client(nc) as fn:
        for i in range(70):
            await asyncio.sleep(pauses[i % len(pauses)])
            started = asyncio.get_running_loop().time()
            assert await fn.invoke("ranked", {"i": i}, priority=(i % 3) * 4 + 1, timeout=3) == {"i": i}
            slowest = max(slowest, asyncio.get_running_loop().time() - started)
    assert slowest < 1.0, f"a call took {slowest:.2f}s: it waited for the periodic look, not its doorbell"


async def test_an_idle_function_is_looked_at_with_one_request_per_consumer(
        nc: NATS, js: JetStreamContext, runtime: Any) -> None:
    """The periodic look (here every ack_wait, 0.5 s) asks the default level's consumer once and
    reads, in one request, what waits at the levels that have no consumer: a level found empty
    again stays listened to, so it is neither subscribed to anew nor asked a second time."""
    await provision(js, 1)
    await runtime(ranked=RANKED.format(concurrency=1) + "    ack_wait: 0.5s\n")
    async with Client(nc) as fn:
        assert await fn.invoke("ranked", {"i": 1}, timeout=5) == {"i": 1}
    await asyncio.sleep(1.0)   # the call's own requests are over
    loop = asyncio.get_running_loop()
    looks: list[list[str]] = []   # the consumers asked and streams read, per look (less than 0.2 s apart)
    last = 0.0

    async def on_request(msg: Any) -> None:
        nonlocal last
        now = loop.time()
        if now - last > 0.2:
            looks.append([])
        last = now
        looks[-1].append(msg.subject.rsplit(".", 1)[1] if "MSG.NEXT" in msg.subject else msg.subject)

    await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{INVOKE_STREAM}.>", cb=on_request)
    await nc.subscribe(f"$JS.API.STREAM.INFO.{INVOKE_STREAM}", cb=on_request)
    await asyncio.sleep(3.0)
    assert len(looks) >= 3, f"a look every 0.5-0.75 s: {looks}"
    for asked in looks[:-1]:   # the last may still be going on
        assert sorted(asked) == [f"$JS.API.STREAM.INFO.{INVOKE_STREAM}", "ranked"], asked
    names = {c.name for c in await invoke_consumers(js)}
    assert names == {"ranked"}, "no call waited at another level: it has no consumer"


async def test_a_level_gets_its_consumer_when_a_call_first_waits_there(nc: NATS, js: JetStreamContext,
                                                                       runtime: Any) -> None:
    """Deployed, a function has one consumer, its default level's: another level gets its own when a
    call first waits there, and again if it was deleted by hand while calls wait."""
    async def consumers() -> set[str]:
        return {c.name for c in await invoke_consumers(js)}

    await provision(js, 1)
    events, _ = await collect(nc, "prio.>")
    await runtime(ranked=RANKED.format(concurrency=1))
    seen = Starts(events)
    assert await consumers() == {"ranked"}
    await publish_levels(js, 9, 3)
    await eventually(lambda: seen.ends == 3, timeout=10, message="the level-9 calls ran")
    assert await consumers() == {"ranked", "ranked_L9"}
    await js.delete_consumer(INVOKE_STREAM, "ranked_L9")
    await publish_levels(js, 9, 3, first=10)
    await eventually(lambda: seen.ends == 6, timeout=10, message="the level-9 calls after the deletion ran")
    assert seen.starts == [9] * 6
    assert await consumers() == {"ranked", "ranked_L9"}
