"""A three-node JetStream cluster with replicated streams: what R3 keeps when a node dies.

Every test runs against a real cluster (``tests/cluster.py``): three nats-server processes on
loopback, each with its own store, killed with SIGKILL and restarted by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import nats.errors
import pytest
import yaml
from nats.aio.client import Client as NATS

from runtime import Client
from runtime.app import Runtime
from runtime.crontab import parse_tick
from runtime.dlqlist import list_dead_letters
from runtime.errors import ConfigError, FnRuntimeError, InvocationTimeout, NoResult
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.settings import Settings
from runtime.streams import (
    CRON_BUCKET,
    DLQ_BODIES_BUCKET,
    DLQ_STREAM,
    ERRORS_BUCKET,
    INVOKE_STREAM,
    MANIFESTS_BUCKET,
    OWNED_STREAMS,
    RESULTS_BUCKET,
    provision_base,
)

from .cluster import CONFIGS, NAMES, Cluster
from .conftest import ROOT, RuntimeProcess, eventually

# Every stream the runtime owns, its buckets' included.
ALL_STREAMS = sorted(OWNED_STREAMS | {f"KV_{b}" for b in (RESULTS_BUCKET, ERRORS_BUCKET, MANIFESTS_BUCKET,
                                                           CRON_BUCKET)} | {f"OBJ_{DLQ_BODIES_BUCKET}"})
RESUME_WITHIN = 10.0   # seconds: publishing and invocations after losing the node that leads FN

WORK = """\
name: work
handler: tests.handlers.rpc:counted
concurrency: 8
timeout: 5s
"""


def runs(scratch: Path, function: str = "work") -> list[str]:
    """The call ids of every run of ``function`` so far (one line per run, from every process)."""
    path = scratch / f"runs-{function}"
    return path.read_text().split() if path.exists() else []


class Load:
    """Publishers that each wait for the acknowledgement of every invocation before sending the next.

    A publish that fails or goes unacknowledged is sent again with the same call id until it is
    acknowledged, as a careful caller would: the stream's duplicate window stores it once.
    """

    def __init__(self, client: Client, function: str = "work", publishers: int = 3, pace: float = 0.03) -> None:
        self.client = client
        self.function = function
        self.publishers = publishers
        self.pace = pace
        self.acked: dict[str, float] = {}      # call id -> when its acknowledgement came
        self.failed: list[float] = []          # when a publish failed (and was retried)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._publish(k)) for k in range(self.publishers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _publish(self, k: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(10**6):
            call_id = f"p{k}-{i}"
            while not self._stop.is_set():
                try:
                    await self.client.submit(self.function, {"n": i}, call_id=call_id)
                except Exception:
                    self.failed.append(loop.time())
                    await asyncio.sleep(0.1)
                    continue
                self.acked[call_id] = loop.time()
                break
            if self._stop.is_set():
                return
            await asyncio.sleep(self.pace)

    def first_ack_after(self, t: float) -> float | None:
        return min((a for a in self.acked.values() if a > t), default=None)


class RunWatch:
    """When each call id was first seen run (the handler writes one line per run)."""

    def __init__(self, scratch: Path, function: str = "work") -> None:
        self.scratch = scratch
        self.function = function
        self.first_seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for call_id in runs(self.scratch, self.function):
                self.first_seen.setdefault(call_id, now)
            await asyncio.sleep(0.05)


def start_runtimes(cluster: Cluster, manifests: Path, tmp_path: Path, count: int,
                   extra: list[str] | None = None) -> list[RuntimeProcess]:
    return [RuntimeProcess(cluster.url, manifests, tmp_path / f"runtime-{i}.log",
                           ["--replicas", "3", "--grace", "2s", *(extra or [])])
            for i in range(count)]


@contextlib.asynccontextmanager
async def serving(procs: list[RuntimeProcess]) -> AsyncIterator[list[RuntimeProcess]]:
    try:
        await asyncio.gather(*(p.wait_ready(30) for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


async def no_acked_call_lost(load: Load, scratch: Path, timeout: float = 30.0) -> Counter[str]:
    """Every acknowledged call id ran (waits for the last ones); returns the run count per call id."""
    async def all_ran() -> bool:
        return set(load.acked) <= set(runs(scratch))
    with contextlib.suppress(AssertionError):
        await eventually(all_ran, timeout=timeout, interval=0.2, message="every acknowledged invocation to run")
    counts = Counter(runs(scratch))
    lost = sorted(set(load.acked) - set(counts))
    assert not lost, f"{len(lost)} of {len(load.acked)} acknowledged invocations never ran: {lost[:10]}"
    return counts


def duplicates(counts: Counter[str]) -> int:
    return sum(n - 1 for n in counts.values())


# ------------------------------------------------------------------ replicas


async def test_every_owned_stream_and_bucket_has_three_replicas(cluster: Cluster, tmp_path: Path) -> None:
    nc = await cluster.connect()
    try:
        # Created with one replica first (as by an earlier single-replica runtime), then scaled in place.
        await provision_base(nc.jetstream(), replicas=1)
        owned = sorted(str(s.config.name) for s in await nc.jetstream().streams_info())   # the runtime's, all of them
        assert set(ALL_STREAMS) <= set(owned)
        assert {s: await cluster.replicas_of(nc, s) for s in owned} == dict.fromkeys(owned, 1)
        rt = Runtime(Settings(project_root=ROOT, data_dir=tmp_path / "rt", replicas=3), cluster.url)
        await rt.start()
        await rt.stop()
        assert {s: await cluster.replicas_of(nc, s) for s in owned} == dict.fromkeys(owned, 3)
        await cluster.wait_current(nc, owned)
        for stream in owned:
            info = await nc.jetstream().stream_info(stream)
            assert info.cluster is not None and info.cluster.leader in NAMES
            peers = [str(info.cluster.leader), *(str(r.name) for r in info.cluster.replicas or [])]
            assert sorted(peers) == list(NAMES)
        # A command not told how many replicas leaves the registry's as they are.
        await Registry.open(nc.jetstream())
        assert await cluster.replicas_of(nc, f"KV_{MANIFESTS_BUCKET}") == 3
        with pytest.raises(ConfigError, match=r"cannot keep 5 replicas of stream \w+: the cluster has fewer "
                                              r"than 5 JetStream nodes available"):
            await provision_base(nc.jetstream(), replicas=5)
    finally:
        await nc.close()


AUDIT = "name: audit\nhandler: tests.handlers.events:audit\nconcurrency: 4\ntriggers:\n  - subject: orders.>\n"


async def test_a_trigger_keeps_taking_events_when_the_node_leading_its_consumer_dies(
        cluster: Cluster, manifest_dir: Callable[..., Path], tmp_path: Path) -> None:
    from runtime.triggers import TRIGGERS_STREAM, consumer_name
    from tests.handlers import events

    events.seen.clear()
    settings = Settings(project_root=ROOT, data_dir=tmp_path / "rt", grace=2.0, replicas=3, trust=("tests",),
                        manifests=(manifest_dir(audit=AUDIT),))
    # The deploy of serve --manifests creates FN_TRIGGERS, with the runtime's replicas.
    async with Runtime(settings, cluster.url):
        pass
    nc = await cluster.connect()
    try:
        js = nc.jetstream(timeout=5)
        assert await cluster.replicas_of(nc, TRIGGERS_STREAM) == 3
        consumer = consumer_name("audit", "orders-all")
        info = await js.consumer_info(TRIGGERS_STREAM, consumer)
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        leader = str(info.cluster.leader)
        others = [name for name in NAMES if name != leader]
        # A runtime on the other two nodes: it does not reconnect when the consumer's leader dies.
        async with Runtime(settings, cluster.urls(*others)):
            await js.publish("orders.created", b'{"id": 1}')
            await eventually(lambda: len(events.seen.get("audit", [])) == 1, timeout=10, message="the first event")
            cluster.kill(leader)
            await nc.close()
            nc = await cluster.connect()
            killed = asyncio.get_running_loop().time()
            js = nc.jetstream(timeout=5)
            while True:   # through the stream's election, if its leader died too
                try:
                    await js.publish("orders.created", b'{"id": 2}')
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            await eventually(lambda: len(events.seen.get("audit", [])) == 2, timeout=RESUME_WITHIN + 5,
                             message="the event published after the kill to run")
            took = asyncio.get_running_loop().time() - killed
        print(f"\ntrigger failover: killed {leader} (leader of {consumer}); the next event ran {took:.1f}s after")
        assert took < RESUME_WITHIN, f"the trigger resumed only after {took:.1f}s"
    finally:
        await nc.close()


def test_replicas_a_single_server_cannot_keep_are_one_clear_error(nats_server: EmbeddedServer,
                                                                  tmp_path: Path) -> None:
    env = {**os.environ, "RUNTIME_REPLICAS": "3", "NATS_URL": nats_server.url}
    done = subprocess.run([sys.executable, "-m", "runtime", "serve", "--log-level", "ERROR"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors[-1].startswith("runtime: error: cannot keep 3 replicas of stream"), done.stderr
    assert "not part of a cluster" in errors[-1] and "--replicas 1" in errors[-1]
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ the compose profile


def test_compose_cluster_profile_runs_the_shipped_node_configs(cluster: Cluster) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    nodes = {name: s for name, s in services.items() if "cluster" in s.get("profiles", []) and name in NAMES}
    assert sorted(nodes) == list(NAMES)
    for name, service in nodes.items():
        mounts = [str(v) for v in service.get("volumes", [])]
        assert any(m.startswith(f"./deploy/cluster/{name}.conf:") for m in mounts), mounts
        conf_in_container = next(m.split(":")[1] for m in mounts if m.startswith(f"./deploy/cluster/{name}.conf:"))
        assert service["command"][-2:] == ["-c", conf_in_container]
    runtimes = [s for name, s in services.items() if "cluster" in s.get("profiles", []) and name not in NAMES]
    assert runtimes, "the cluster profile has no runtime"
    for service in runtimes:
        env = service["environment"]
        assert sorted(env["NATS_URL"].split(",")) == [f"nats://{n}:4222" for n in NAMES]
        assert str(env.get("RUNTIME_REPLICAS")) == "3" or "--replicas 3" in str(service["command"])
        assert set(NAMES) <= set(service.get("depends_on", []))
    # The fixture's cluster is those very files, ports remapped: it elected a meta leader and placed R3.
    assert sorted(p.name for p in CONFIGS.glob("*.conf")) == [f"{n}.conf" for n in NAMES]
    for node in cluster.nodes.values():
        assert node.running
        assert f"server_name: {node.name}" in (node.directory / "node.conf").read_text()


# ------------------------------------------------------------------ losing a node


async def test_killing_the_node_that_leads_fn_under_load(cluster: Cluster, manifest_dir: Callable[..., Path],
                                                         scratch: Path, tmp_path: Path) -> None:
    manifests = manifest_dir(work=WORK)
    async with serving(start_runtimes(cluster, manifests, tmp_path, 2)), Client(cluster.url, ack_timeout=2) as client:
        nc = client.nc
        load = Load(client)
        async with RunWatch(scratch) as watch:
            load.start()
            await eventually(lambda: len(watch.first_seen) >= 50, timeout=15, message="steady load")
            leader = await cluster.leader_of(nc, INVOKE_STREAM)
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            cluster.kill(leader)
            await eventually(lambda: load.first_ack_after(killed_at + 0.5), timeout=RESUME_WITHIN + 5,
                             message="a publish acknowledged after the kill")
            publish_gap = (load.first_ack_after(killed_at + 0.5) or 0) - killed_at

            def run_after_kill() -> float | None:
                after = {c for c, t in load.acked.items() if t > killed_at}
                return min((watch.first_seen[c] for c in after if c in watch.first_seen), default=None)
            await eventually(run_after_kill, timeout=RESUME_WITHIN + 5,
                             message="an invocation sent after the kill to run")
            run_gap = (run_after_kill() or 0) - killed_at
            await eventually(lambda: len([t for t in load.acked.values() if t > killed_at]) >= 100, timeout=20,
                             message="steady load again")
            await load.stop()
        counts = await no_acked_call_lost(load, scratch)
        new_leader = await cluster.leader_of(nc, INVOKE_STREAM)
    print(f"\nfailover: killed {leader} (FN leader, now {new_leader}); publishing resumed after {publish_gap:.1f}s, "
          f"invocations after {run_gap:.1f}s; {len(load.acked)} acknowledged, {len(counts)} ran, "
          f"{duplicates(counts)} duplicate run(s)")
    assert publish_gap < RESUME_WITHIN, f"publishing resumed only after {publish_gap:.1f}s"
    assert run_gap < RESUME_WITHIN, f"invocations resumed only after {run_gap:.1f}s"
    assert counts, "nothing ran"
    assert new_leader != leader


class Callers:
    """Request-reply callers: each waits for its answer; a call that times out is looked up later by id,
    and one that could not be sent is sent again with the same id (it runs once either way)."""

    def __init__(self, client: Client, callers: int = 2, timeout: float = 3.0) -> None:
        self.client = client
        self.callers = callers
        self.timeout = timeout
        self.answered: dict[str, Any] = {}
        self.timed_out: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._call(k)) for k in range(self.callers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _call(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            call_id = f"rpc{k}-{i}"
            i += 1
            while True:
                try:
                    self.answered[call_id] = await self.client.invoke("work", {"value": call_id}, call_id=call_id,
                                                                      timeout=self.timeout)
                except InvocationTimeout:
                    self.timed_out.append(call_id)
                except Exception:
                    if self._stop.is_set():
                        break
                    await asyncio.sleep(0.1)
                    continue
                break
            await asyncio.sleep(0.05)


def ticks(scratch: Path) -> Counter[datetime]:
    """Runs per cron tick of the ``tick`` schedule."""
    return Counter(parse_tick(c.split(":", 2)[2]) for c in runs(scratch) if c.startswith("cron:tick:"))


async def test_rolling_restart_of_every_node_under_load(cluster: Cluster, manifest_dir: Callable[..., Path],
                                                        scratch: Path, tmp_path: Path) -> None:
    every_second = WORK + 'schedules:\n  - {name: tick, cron: "* * * * * *", catchup: all}\n'
    manifests = manifest_dir(work=every_second)
    async with serving(start_runtimes(cluster, manifests, tmp_path, 2)), Client(cluster.url, ack_timeout=2) as client:
        nc = client.nc
        load, callers = Load(client, publishers=2), Callers(client)
        load.start()
        callers.start()
        await eventually(lambda: len(load.acked) >= 30 and callers.answered, timeout=15, message="steady load")
        began = datetime.now(UTC)
        for name in NAMES:
            await cluster.stop_node(name)
            await asyncio.sleep(1.0)
            await cluster.restart(name)
            await cluster.wait_current(nc, ALL_STREAMS)
        ended = datetime.now(UTC)
        await eventually(lambda: len(load.acked) >= 300, timeout=20, message="load after the restarts")
        await load.stop()
        await callers.stop()
        counts = await no_acked_call_lost(load, scratch)
        for call_id in callers.timed_out:
            assert await client.result(call_id, wait=10) == {"call_id": call_id, "pid": ANY, "value": call_id}
        for call_id, answer in callers.answered.items():
            assert answer["call_id"] == call_id
    fired = ticks(scratch)
    during = [began.replace(microsecond=0) + timedelta(seconds=s)
              for s in range(1, int((ended - began).total_seconds()))]
    print(f"\nrolling restart ({(ended - began).total_seconds():.1f}s): {len(load.acked)} acknowledged, "
          f"{duplicates(counts - Counter({t: n for t, n in counts.items() if t.startswith('cron:')}))} duplicate "
          f"run(s); {len(callers.answered)} answered, {len(callers.timed_out)} timed out; "
          f"{len(during)} ticks during it, missing {[t for t in during if t not in fired]}, "
          f"twice {[t for t in during if fired[t] > 1]}")
    assert {t: fired[t] for t in during} == dict.fromkeys(during, 1), "every tick during the restart fires once"


async def test_node_down_runtime_reconnects_dead_letters_and_deploys_keep_working(
        cluster: Cluster, manifest_dir: Callable[..., Path], scratch: Path, tmp_path: Path) -> None:
    fails = "name: fails\nhandler: tests.handlers.core:always_fail\nretry: {max_deliver: 1}\n"
    settings = Settings(project_root=ROOT, data_dir=tmp_path / "rt", grace=2.0, replicas=3, trust=("tests",),
                        manifests=(manifest_dir(work=WORK, fails=fails),))
    async with Runtime(settings, cluster.url) as rt, Client(cluster.url, ack_timeout=2) as client:
        assert rt.nc is not None and rt.nc.connected_url is not None
        home = next(n for n in cluster.nodes.values() if n.port == rt.nc.connected_url.port)
        assert (await client.invoke("work", {"value": 1}, timeout=5))["value"] == 1
        cluster.kill(home.name)

        def moved() -> bool:
            nc = rt.nc
            url = nc.connected_url if nc is not None else None
            return nc is not None and nc.is_connected and url is not None and url.port != home.port
        await eventually(moved, timeout=10, message="the runtime to reconnect to another node")
        # Through the elections that follow (up to ~10 s) and the runtime's next pull.
        assert (await retried(lambda: client.invoke("work", {"value": 2}, timeout=20)))["value"] == 2
        assert not rt.lost.is_set(), "the runtime kept running: no restart"
        for stream in ALL_STREAMS:   # with one node down for good from here on
            assert await cluster.leader_of(client.nc, stream) != home.name

        failing = await retried(lambda: client.submit("fails", {"n": 1}))
        js = client.js
        # Within seconds here; the mover's consumer on FN_EVENTS may still be electing its leader on a
        # loaded machine (once, with other tests running beside the suite: over 15 s).
        letters = await eventually(lambda: dead_letters(client.nc), timeout=30, message="the dead letter")
        assert [d.call_id for d in letters] == [failing.id]
        assert (await js.stream_info(DLQ_STREAM)).config.num_replicas == 3

        extra = manifest_dir(extra="name: extra\nhandler: tests.handlers.rpc:square\n")
        deploy = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "runtime", "deploy", "--server", cluster.url, str(extra)],
            cwd=ROOT, env={**os.environ, "RUNTIME_TRUST": "tests"}, capture_output=True, text=True, timeout=30)
        assert deploy.returncode == 0, deploy.stderr
        assert "function extra: created" in deploy.stdout
        answer = await eventually(lambda: answers(client, "extra", {"n": 7, "token": "t"}), timeout=15,
                                  message="the deployed function to answer")
        assert answer == {"token": "t", "square": 49}
        # A level no call used before gets its consumer now, replicated on the two nodes left.
        assert "work_L9" not in {c.name for c in await js.consumers_info(INVOKE_STREAM)}
        assert (await retried(lambda: client.invoke("work", {"value": 3}, priority=9, timeout=20)))["value"] == 3
        urgent = await js.consumer_info(INVOKE_STREAM, "work_L9")
        assert urgent.cluster is not None and urgent.cluster.leader in NAMES and urgent.cluster.leader != home.name
        assert len(urgent.cluster.replicas or []) == 2, "three replicas, as FN has"
        assert not rt.lost.is_set()


async def retried(call: Callable[[], Any], within: float = 30.0) -> Any:
    """A call made again (same arguments) while the cluster elects new leaders, for up to ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            return await call()
        except (InvocationTimeout, NoResult):
            raise
        except Exception:
            await asyncio.sleep(0.25)
    return await call()


async def dead_letters(nc: NATS) -> list[Any] | None:
    try:
        listing = await list_dead_letters(nc, nc.jetstream())
    except nats.errors.TimeoutError:
        return None   # the dead-letter stream is still electing a leader after the node went down
    return listing.letters or None


async def answers(client: Client, function: str, payload: Any) -> Any:
    with contextlib.suppress(FnRuntimeError):
        return await client.invoke(function, payload, timeout=2)
    return None
