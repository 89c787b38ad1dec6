"""Event-loop blocking: detected, named, timed and counted; well-behaved handlers trigger nothing."""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.app import Runtime
from runtime.blocking import LoopMonitor, find_culprit, running_frame
from runtime.loader import inspect_handler
from runtime.results import fetch_response
from runtime.status import gather_status

from .conftest import RuntimeFactory, eventually
from .handlers import blocking as handlers

HANDLERS = "tests.handlers.blocking"
LOGGER = "runtime.blocking"
ENDED = re.compile(r"event loop was blocked for (\d+\.\d)s (.*); every function of this runtime was stalled")


def fn(name: str, handler: str) -> str:
    return f"name: {name}\nhandler: {HANDLERS}:{handler}\n"


def line_of(func: Any, text: str) -> int:
    """The line number of the first line of ``func``'s source containing ``text``."""
    lines, first = inspect.getsourcelines(func)
    return first + next(i for i, line in enumerate(lines) if text in line)


def monitor_of(rt: Runtime, threshold: float) -> LoopMonitor:
    monitor = rt.monitor
    assert monitor in rt.components, "every runtime watches its event loop"
    monitor.threshold = threshold
    return monitor


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def ended(caplog: pytest.LogCaptureFixture) -> list[tuple[float, str]]:
    return [(float(m[1]), m[2]) for w in warnings(caplog) if (m := ENDED.search(w))]


async def invoke(js: JetStreamContext, function: str, call_id: str, body: bytes = b"{}") -> Any:
    await js.publish(f"fn.invoke.{function}", body, headers={"Nats-Msg-Id": call_id})
    response = await eventually(lambda: fetch_response(js, call_id), timeout=10, message=f"{call_id} to finish")
    return response.value()


async def loop_status(nc: NATS) -> dict[str, Any]:
    [status] = await gather_status(nc, 0.2)
    loop: dict[str, Any] = status["loop"]
    return loop


async def test_a_blocking_handler_is_named_timed_and_counted(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    rt = await runtime(hog=fn("hog", "hog"), polite=fn("polite", "polite"))
    monitor_of(rt, threshold=0.5)

    assert await invoke(js, "hog", "hog-1", b'{"seconds": 1.5}') == {"slept": 1.5}
    await eventually(lambda: ended(caplog), timeout=5, message="the end of the block to be logged")

    line = line_of(handlers.hog, "time.sleep")
    during = [w for w in warnings(caplog) if "for more than" in w]
    assert during == [f"event loop blocked for more than 0.5s by function hog "
                      f"({HANDLERS}:hog at tests/handlers/blocking.py:{line})"]
    [(seconds, culprit)] = ended(caplog)
    assert culprit == "by function hog"
    assert 1.2 <= seconds < 5
    loop = await loop_status(nc)
    assert loop["blocked"] == 1 and 1.2 <= loop["blocked_seconds"] < 5
    assert loop["functions"]["hog"]["blocked"] == 1
    assert list(loop["functions"]) == ["hog"]
    # The runtime carries on: another function completes, and the block was the only one.
    assert await invoke(js, "polite", "polite-1") == {"slept": 0.0}
    assert len(ended(caplog)) == 1


async def test_the_handler_is_found_behind_a_helper_and_as_a_bound_method(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, caplog: pytest.LogCaptureFixture) -> None:
    rt = await runtime(helper=fn("helper", "hog_in_helper"), obj=fn("obj", "hogs.run"))
    monitor_of(rt, threshold=0.3)

    await invoke(js, "helper", "helper-1", b'{"seconds": 0.8}')
    await invoke(js, "obj", "obj-1", b'{"seconds": 0.8}')
    await eventually(lambda: len(ended(caplog)) == 2, timeout=5, message="both blocks to be logged")

    during = [w for w in warnings(caplog) if "for more than" in w]
    calls = line_of(handlers.hog_in_helper, "_wait_for_disk(")
    sleeps = line_of(handlers._wait_for_disk, "time.sleep")
    assert during[0] == (f"event loop blocked for more than 0.3s by function helper ({HANDLERS}:hog_in_helper "
                         f"at tests/handlers/blocking.py:{calls}, in _wait_for_disk at "
                         f"tests/handlers/blocking.py:{sleeps})")
    in_method = line_of(handlers.Hogs.run, "time.sleep")
    assert during[1] == (f"event loop blocked for more than 0.3s by function obj ({HANDLERS}:hogs.run "
                         f"at tests/handlers/blocking.py:{in_method})")
    assert [culprit for _, culprit in ended(caplog)] == ["by function helper", "by function obj"]
    loop = await loop_status(nc)
    assert loop["blocked"] == 2 and set(loop["functions"]) == {"helper", "obj"}


async def test_a_block_outside_any_handler_is_reported_as_such(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, caplog: pytest.LogCaptureFixture) -> None:
    rt = await runtime(polite=fn("polite", "polite"))
    monitor_of(rt, threshold=0.3)

    time.sleep(0.8)  # the runtime shares this test's event loop: block it from outside any handler
    await eventually(lambda: ended(caplog), timeout=5, message="the end of the block to be logged")

    line = line_of(test_a_block_outside_any_handler_is_reported_as_such, "time.sleep(0.8)")
    here = f"in test_a_block_outside_any_handler_is_reported_as_such at tests/test_blocking.py:{line}"
    assert [w for w in warnings(caplog) if "for more than" in w] == [
        f"event loop blocked for more than 0.3s outside any handler ({here})"]
    [(seconds, culprit)] = ended(caplog)
    assert culprit == f"outside any handler ({here})" and 0.6 <= seconds < 5
    loop = await loop_status(nc)
    assert loop["blocked"] == 1 and loop["functions"] == {}


async def test_well_behaved_async_handlers_trigger_nothing(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    rt = await runtime(polite=fn("polite", "polite"))
    monitor_of(rt, threshold=0.3)

    for i in range(3):  # each waits longer than the threshold, without blocking the loop
        assert await invoke(js, "polite", f"polite-{i}", b'{"seconds": 0.5}') == {"slept": 0.5}
    assert warnings(caplog) == []
    assert await loop_status(nc) == {"blocked": 0, "blocked_seconds": 0.0, "functions": {}}

    await rt.stop()
    assert not [t for t in threading.enumerate() if t.name == "loop-monitor"], "the monitor thread ends"


class Parker:
    """A callable object: the monitor looks for its class's ``__call__``."""

    def __init__(self) -> None:
        self.parked, self.release = threading.Event(), threading.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.parked.set()
        self.release.wait(5)


def test_the_stack_of_another_thread_is_readable() -> None:
    # Pins sys._current_frames, the one private-looking interface the monitor relies on.
    parker = Parker()
    thread = threading.Thread(target=parker, args=({},))
    thread.start()
    try:
        assert parker.parked.wait(5)
        assert thread.ident is not None
        handler = replace(inspect_handler("tests.test_blocking:parker", parker.__call__), func=parker)
        name, where = find_culprit(running_frame(thread.ident), {"park": handler})
        nothing, elsewhere = find_culprit(running_frame(thread.ident), {})
    finally:
        parker.release.set()
        thread.join(5)
    line = line_of(Parker.__call__, "release.wait")
    assert name == "park"
    assert where.startswith(f"tests.test_blocking:parker at tests/test_blocking.py:{line}, in ")
    assert nothing is None and elsewhere.startswith("in ") and "threading.py" in elsewhere
