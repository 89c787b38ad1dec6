"""Cron schedules against a real server: one invocation per tick across runtimes, catch-up, errors, CLI."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from runtime.crontab import format_tick, parse_tick
from runtime.errors import ManifestError
from runtime.manifest import ManifestSet, Schedule
from runtime.scheduler import CronRecord
from runtime.server import EmbeddedServer

from .conftest import ROOT, RuntimeFactory, collect, eventually

TWO = timedelta(seconds=2)
ONE = timedelta(seconds=1)


def ticker(*schedules: dict[str, Any], name: str = "ticker") -> str:
    """A function manifest whose handler reports each run's tick on test.cron.<name>."""
    lines = [f"name: {name}", "handler: tests.handlers.cron:tick", "schedules:"]
    lines += [f"  - {json.dumps(s)}" for s in schedules]
    return "\n".join(lines) + "\n"


class Reports:
    """The runs the handler reported, per schedule."""

    def __init__(self, msgs: list[Msg]) -> None:
        self.msgs = msgs

    def all(self, schedule: str | None = None) -> list[dict[str, Any]]:
        runs = [json.loads(m.data) for m in self.msgs]
        return [r for r in runs if schedule is None or r["schedule"] == schedule]

    def ticks(self, schedule: str) -> list[datetime]:
        return [parse_tick(r["scheduled_at"]) for r in self.all(schedule)]

    def newest(self, schedule: str) -> datetime | None:
        return max(self.ticks(schedule), default=None)


async def reports(nc: NATS, function: str = "ticker") -> Reports:
    msgs, _ = await collect(nc, f"test.cron.{function}")
    return Reports(msgs)


async def cron_record(js: JetStreamContext, name: str) -> CronRecord:
    kv = await js.key_value("fn_cron")
    return CronRecord.model_validate_json((await kv.get(name)).value)


def seconds_from(first: datetime, last: datetime, step: timedelta) -> list[datetime]:
    out, tick = [], first
    while tick <= last:
        out.append(tick)
        tick += step
    return out


async def test_three_runtimes_publish_each_tick_exactly_once(runtime_process: Callable[..., Any],
                                                             manifest_dir: Callable[..., Path], nc: NATS,
                                                             js: JetStreamContext) -> None:
    directory = manifest_dir(ticker=ticker({"name": "every-2s", "cron": "*/2 * * * * *", "payload": {"n": 7}}))
    runs = await reports(nc)
    # A core subscription sees every publish, duplicates included: each runtime's copy of each tick.
    copies: Counter[str] = Counter()
    first_seen: dict[str, float] = {}

    async def on_publish(msg: Msg) -> None:
        stamp = (msg.headers or {})["Fn-Scheduled-At"]
        copies[stamp] += 1
        first_seen.setdefault(stamp, time.time())

    await nc.subscribe("fn.invoke.ticker", cb=on_publish)
    procs = [runtime_process(directory) for _ in range(3)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    ready = datetime.now(UTC)
    end = ready + timedelta(seconds=20)
    # One tick more than the window, so that a duplicate of any tick in it would have shown up.
    await eventually(lambda: (runs.newest("every-2s") or ready) > end + TWO, timeout=30, message="20 s of ticks")

    ticks = runs.ticks("every-2s")
    assert [t for t, n in Counter(ticks).items() if n > 1] == []                       # no duplicates
    assert sorted(ticks) == seconds_from(min(ticks), max(ticks), TWO)                  # no gaps
    window = [t for t in ticks if ready < t <= end]
    assert len(window) == 10
    # Every runtime published every tick of the window; the stream kept one of each.
    assert {copies[format_tick(t)] for t in window} == {3}
    for t in window:  # published on time
        assert 0 <= first_seen[format_tick(t)] - t.timestamp() < 1.0
    run = runs.all("every-2s")[-1]
    assert run["payload"] == {"n": 7} and run["attempt"] == 1
    assert len({r["pid"] for r in runs.all()}) >= 2                                    # work was shared
    record = await cron_record(js, "every-2s")
    assert record.last is not None and record.last >= max(window) and record.function == "ticker"


async def test_missed_ticks_follow_catchup_after_the_whole_fleet_stops(runtime: RuntimeFactory, nc: NATS,
                                                                       js: JetStreamContext) -> None:
    names = {"none": "missed-none", "latest": "missed-latest", "all": "missed-all"}
    manifest = ticker(*({"name": name, "cron": "* * * * * *", "catchup": policy} for policy, name in names.items()))
    runs = await reports(nc)
    first = await runtime(ticker=manifest)
    await eventually(lambda: all(len(runs.ticks(n)) >= 2 for n in names.values()), timeout=10,
                     message="two ticks of each schedule")
    await first.stop()
    last = {n: (await cron_record(js, n)).last for n in names.values()}
    assert all(t is not None for t in last.values())
    newest_last = max(t for t in last.values() if t is not None)

    # Nothing runs for several ticks; restart just after a tick so the start time is known to the second.
    restart = math.floor(max(newest_last.timestamp() + 4, time.time())) + 1.05
    await asyncio.sleep(restart - time.time())
    began = time.time()
    await runtime(ticker=manifest)
    assert time.time() - math.floor(began) < 0.95, "the runtime took too long to start for this check"
    restart_tick = datetime.fromtimestamp(math.floor(began), UTC)
    await eventually(lambda: all((runs.newest(n) or newest_last) >= restart_tick + TWO for n in names.values()),
                     timeout=10, message="ticks after the restart")

    for policy, name in names.items():
        ticks = runs.ticks(name)
        stamp = last[name]
        assert stamp is not None
        missed = seconds_from(stamp + ONE, restart_tick, ONE)
        assert len(missed) >= 3
        fired_missed = sorted(t for t in ticks if t in missed)
        expected = {"none": [], "latest": missed[-1:], "all": missed}[policy]
        assert fired_missed == expected, policy
        assert [t for t, n in Counter(ticks).items() if n > 1] == [], policy
        # Before the stop and after the restart, every tick ran.
        assert set(seconds_from(min(ticks), stamp, ONE)) <= set(ticks), policy
        assert {restart_tick + ONE, restart_tick + TWO} <= set(ticks), policy


async def test_set_schedules_replaces_the_running_set(runtime: RuntimeFactory, nc: NATS) -> None:
    runs = await reports(nc)
    rt = await runtime(ticker=ticker({"name": "old", "cron": "* * * * * *"}))
    assert rt.scheduler is not None
    await eventually(lambda: runs.ticks("old"), timeout=5, message="the first schedule")
    rt.scheduler.set_schedules([Schedule(name="new", cron="* * * * * *", function="ticker", payload={"v": 2}),
                                Schedule(name="off", cron="* * * * * *", function="ticker", enabled=False)])
    changed = datetime.now(UTC)
    await eventually(lambda: len(runs.ticks("new")) >= 2, timeout=5, message="the new schedule")
    assert runs.all("new")[0]["payload"] == {"v": 2}
    assert all(t <= changed + ONE for t in runs.ticks("old"))
    assert runs.ticks("off") == []


async def test_a_failing_tick_is_retried_then_dead_lettered(runtime: RuntimeFactory, nc: NATS) -> None:
    runs = await reports(nc)
    dead, _ = await collect(nc, "fn.dead.ticker")
    manifest = ticker({"name": "doomed", "cron": "* * * * * *"}).replace(
        "tests.handlers.cron:tick", "tests.handlers.cron:failing_tick")
    await runtime(ticker=manifest + "retry:\n  max_deliver: 2\n  backoff: [100ms]\n")
    await eventually(lambda: dead, timeout=5, message="a dead letter")
    letter = dead[0].headers
    assert letter["Fn-Schedule"] == "doomed" and letter["Fn-Reason"] == "max_deliver"
    assert letter["Fn-Call-Id"] == f"cron:doomed:{letter['Fn-Scheduled-At']}"
    attempts = [r["attempt"] for r in runs.all("doomed") if r["scheduled_at"] == letter["Fn-Scheduled-At"]]
    assert attempts == [1, 2]


@pytest.mark.parametrize(("files", "message"), [
    ({"f": ticker({"name": "s", "cron": "61 * * * *"})},
     r"f.yaml: schedules\[0\].cron: '61 \* \* \* \*' is not a valid cron expression"),
    ({"f": ticker({"name": "s", "cron": "* * *"})}, r"schedules\[0\].cron: '\* \* \*' has 3 fields"),
    ({"f": ticker({"name": "s", "cron": "@daily", "timezone": "Mars/Olympus"})},
     r"schedules\[0\].timezone: unknown timezone 'Mars/Olympus'"),
    ({"f": ticker({"name": "s", "cron": "@daily", "catchup": "some"})},
     r"schedules\[0\].catchup: Input should be 'none', 'latest' or 'all'"),
    ({"s": "kind: Schedule\nname: s\nfunction: nope\ncron: '@daily'\n"}, r"s.yaml: function: unknown function 'nope'"),
    ({"s": "kind: Schedule\nname: s\nfunction: ticker\ncron: '0 0 30 2 *'\n", "ticker": ticker()},
     r"s.yaml: cron: '0 0 30 2 \*' never fires"),
    ({"s": "kind: Schedule\nname: s\nfunction: ticker\ncron: '@daily'\ntimezone: localtime\n", "ticker": ticker()},
     r"s.yaml: timezone: 'localtime' depends on each host's setting"),
    ({"s": "kind: Schedule\nname: dup\nfunction: ticker\ncron: '@daily'\n",
      "ticker": ticker({"name": "dup", "cron": "@hourly"})}, r"name: schedule 'dup' is already declared in"),
])
def test_bad_schedules_are_manifest_errors_naming_the_field(manifest_dir: Callable[..., Path], files: dict[str, str],
                                                            message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        ManifestSet.load([manifest_dir(**files)])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)


async def test_schedules_command_lists_next_and_last_fire(runtime: RuntimeFactory, nc: NATS,
                                                          nats_server: EmbeddedServer,
                                                          manifest_dir: Callable[..., Path]) -> None:
    manifest = ticker({"name": "each-second", "cron": "* * * * * *"},
                      {"name": "paris-morning", "cron": "0 9 * * *", "timezone": "Europe/Paris"},
                      {"name": "paused", "cron": "@hourly", "enabled": False})
    directory = manifest_dir(ticker=manifest)
    offline = await asyncio.to_thread(run_cli, "schedules", "--manifests", str(directory), "--json")
    assert offline.returncode == 0, offline.stderr
    listed = {e["name"]: e for e in json.loads(offline.stdout)}
    morning = listed["paris-morning"]
    assert (morning["function"], morning["cron"], morning["timezone"]) == ("ticker", "0 9 * * *", "Europe/Paris")
    assert morning["next_local"][11:19] == "09:00:00" and morning["last"] is None
    assert parse_tick(morning["next"]) == datetime.fromisoformat(morning["next_local"])
    assert listed["paused"]["next"] is None and listed["paused"]["enabled"] is False

    runs = await reports(nc)
    await runtime(ticker=manifest)
    await eventually(lambda: runs.ticks("each-second"), timeout=5, message="a tick")
    newest = runs.newest("each-second")
    assert newest is not None
    online = await asyncio.to_thread(run_cli, "schedules", "--server", nats_server.url, "--json")
    assert online.returncode == 0, online.stderr
    listed = {e["name"]: e for e in json.loads(online.stdout)}
    assert set(listed) == {"each-second", "paris-morning", "paused"}
    assert parse_tick(listed["each-second"]["last"]) >= newest
    assert listed["paris-morning"]["last"] is None

    table = await asyncio.to_thread(run_cli, "schedules", "-m", str(directory), "-s", nats_server.url)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["NAME", "FUNCTION", "CRON", "TIMEZONE", "NEXT", "(LOCAL)", "NEXT", "(UTC)", "LAST",
                              "FIRE"]
    rows = {line.split()[0]: line for line in lines}
    assert " 09:00:00 CE" in rows["paris-morning"] and rows["paris-morning"].endswith("never")
    assert "disabled" in rows["paused"]


async def test_schedules_command_errors_are_one_line(manifest_dir: Callable[..., Path]) -> None:
    bad = manifest_dir(ticker=ticker({"name": "s", "cron": "@daily", "timezone": "Nowhere/Land"}))
    result = await asyncio.to_thread(run_cli, "schedules", "--manifests", str(bad))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "schedules[0].timezone: unknown timezone 'Nowhere/Land'" in result.stderr
