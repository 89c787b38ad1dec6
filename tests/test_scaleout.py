"""Several runtime processes on one server: sharing, concurrency limits, SIGTERM and SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext

from .conftest import RuntimeProcess, eventually

TRACKED = """\
name: tracked
handler: tests.handlers.core:tracked
concurrency: {concurrency}
timeout: 30s
ack_wait: {ack_wait}
retry:
  max_deliver: 5
  backoff: [100ms]
"""


def runs(scratch: Path) -> Counter[int]:
    counts: Counter[int] = Counter()
    for path in scratch.glob("runs-*"):
        counts.update(int(line.split(":")[0]) for line in path.read_text().split())
    return counts


def runs_by_process(scratch: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().split()) for p in scratch.glob("runs-*")}


def just_started(scratch: Path, pid: int, within: float) -> bool:
    """Process ``pid`` started a run less than ``within`` seconds ago that it has not finished."""
    try:
        started = (scratch / f"started-{pid}").read_text().split()
        finished = set((scratch / f"runs-{pid}").read_text().split())
    except FileNotFoundError:
        return False
    now = time.time()
    return any(line.rsplit(":", 1)[0] not in finished and now - float(line.rsplit(":", 1)[1]) < within
               for line in started)


async def publish_ids(js: JetStreamContext, ids: range, seconds: float) -> None:
    acks = [js.publish("fn.invoke.tracked", b'{"id": %d, "seconds": %g}' % (i, seconds)) for i in ids]
    for chunk in range(0, len(acks), 200):
        await asyncio.gather(*acks[chunk:chunk + 200])


async def settled(js: JetStreamContext) -> bool:
    info = await js.consumer_info("FN", "tracked")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def start_two(runtime_process: Callable[..., RuntimeProcess], manifests: Path,
                    scratch: Path) -> list[RuntimeProcess]:
    procs = [runtime_process(manifests, env={"RUNTIME_TEST_DIR": str(scratch)}) for _ in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    return procs


async def test_two_runtimes_share_messages_each_runs_once(runtime_process: Callable[..., RuntimeProcess],
                                                          manifest_dir: Callable[..., Path], scratch: Path,
                                                          js: JetStreamContext) -> None:
    manifests = manifest_dir(tracked=TRACKED.format(concurrency=64, ack_wait="10s"))
    await start_two(runtime_process, manifests, scratch)
    await publish_ids(js, range(1000), 0.002)
    await eventually(lambda: sum(runs(scratch).values()) >= 1000, timeout=60, message="1000 runs")
    await eventually(lambda: settled(js), timeout=10)
    counts = runs(scratch)
    assert set(counts) == set(range(1000))
    assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1]
    per_process = runs_by_process(scratch)
    assert len(per_process) == 2 and min(per_process.values()) > 0, per_process


async def test_concurrency_is_a_limit_across_runtimes(runtime_process: Callable[..., RuntimeProcess],
                                                      manifest_dir: Callable[..., Path], scratch: Path,
                                                      js: JetStreamContext) -> None:
    manifests = manifest_dir(tracked=TRACKED.format(concurrency=3, ack_wait="10s"))
    await start_two(runtime_process, manifests, scratch)
    await publish_ids(js, range(40), 0.1)
    await eventually(lambda: sum(runs(scratch).values()) >= 40, timeout=30, message="40 runs")
    peaks = [int(x) for x in (scratch / "peak").read_text().split()]
    assert max(peaks) == 3, f"peak in flight {max(peaks)}, limit 3"
    assert len(runs_by_process(scratch)) == 2, "both runtimes took part"


async def test_sigterm_finishes_fetched_work_and_leaves_nothing_pending(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path], scratch: Path,
        js: JetStreamContext) -> None:
    manifests = manifest_dir(tracked=TRACKED.format(concurrency=20, ack_wait="30s"))
    proc = runtime_process(manifests, env={"RUNTIME_TEST_DIR": str(scratch)})
    await proc.wait_ready()
    await publish_ids(js, range(300), 0.2)
    await eventually(lambda: sum(runs(scratch).values()) >= 20, timeout=20, message="work under way")
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(30) == 0, proc.output()
    done = runs(scratch)
    assert max(done.values()) == 1
    info = await js.consumer_info("FN", "tracked")
    # Everything fetched was finished and acked; the rest waits in the stream, undelivered.
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
    assert info.num_pending == 300 - len(done)
    assert info.delivered.stream_seq == len(done) or info.num_pending + len(done) == 300
    # A new runtime takes the remainder: each message exactly once overall.
    proc2 = runtime_process(manifests, env={"RUNTIME_TEST_DIR": str(scratch)})
    await proc2.wait_ready()
    await eventually(lambda: sum(runs(scratch).values()) >= 300, timeout=30, message="all 300 runs")
    assert set(runs(scratch)) == set(range(300)) and max(runs(scratch).values()) == 1


async def test_a_second_signal_exits_at_once(runtime_process: Callable[..., RuntimeProcess],
                                             manifest_dir: Callable[..., Path], scratch: Path,
                                             js: JetStreamContext) -> None:
    manifests = manifest_dir(tracked=TRACKED.format(concurrency=2, ack_wait="30s"))
    proc = runtime_process(manifests, env={"RUNTIME_TEST_DIR": str(scratch)}, extra=["--grace", "60s"])
    await proc.wait_ready()
    await publish_ids(js, range(2), 30)  # would hold a graceful shutdown for 30 s
    await eventually(lambda: (scratch / "peak").exists() and len((scratch / "peak").read_text().split()) == 2)
    proc.signal(signal.SIGTERM)
    await eventually(lambda: "finishing in-flight work" in proc.output())
    started = asyncio.get_running_loop().time()
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(10) == 130
    assert asyncio.get_running_loop().time() - started < 5
    # Nothing is lost: the interrupted invocations are redelivered once their ack wait runs out.
    info = await js.consumer_info("FN", "tracked")
    assert info.num_ack_pending == 2 and not runs(scratch)


async def test_sigkill_hands_unacked_work_to_the_survivor(runtime_process: Callable[..., RuntimeProcess],
                                                          manifest_dir: Callable[..., Path], scratch: Path,
                                                          js: JetStreamContext) -> None:
    manifests = manifest_dir(tracked=TRACKED.format(concurrency=16, ack_wait="1s"))
    victim, survivor = await start_two(runtime_process, manifests, scratch)
    await publish_ids(js, range(200), 0.3)
    # Killed once it has done some work and is in the middle of more: a run it started a moment
    # ago (each takes 0.3 s) is still going when the signal lands.
    await eventually(lambda: runs_by_process(scratch).get(f"runs-{victim.pid}", 0) >= 5
                     and just_started(scratch, victim.pid, within=0.15), timeout=20,
                     message="the victim doing work")
    victim.signal(signal.SIGKILL)
    await victim.wait_exit(10)
    await eventually(lambda: set(runs(scratch)) == set(range(200)), timeout=60, message="every message run")
    await eventually(lambda: settled(js), timeout=10)
    survivor_runs = (scratch / f"runs-{survivor.pid}").read_text().split()
    assert any(not line.endswith(":1") for line in survivor_runs), "the victim's messages were redelivered"
    assert survivor.proc.poll() is None
