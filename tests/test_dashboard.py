"""The dashboard in a real browser: headless Chromium renders the page of a runtime process.

Chromium is driven over the DevTools protocol (a websocket from aiohttp's client): the page's
own script fetches the overview and renders it, and the test reads the DOM, clicks the
buttons and takes a screenshot as a user would see it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.server import free_port
from runtime.streams import DLQ_STREAM

from .conftest import ROOT, RuntimeProcess, eventually

EXAMPLES = ROOT / "manifests"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]
SCREENSHOT = Path("/tmp/dashboard.png")

# Fails until the test's scratch directory holds ``fixed``; one attempt, then a dead letter.
FIXABLE = """\
name: fixable
handler: tests.handlers.deadletters:fixable
retry:
  max_deliver: 1
"""
# Holds its slot until ``release`` appears: work stays in flight and queued while the page is read.
HELD = """\
name: held
handler: tests.handlers.replays:held_fix
concurrency: 1
timeout: 30s
"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    # No skip: the acceptance of the dashboard is this browser test (.ci/run installs chromium).
    assert path, "chromium is not installed: apt-get install chromium (.ci/run does)"
    return path


class Page:
    """One browser tab over the DevTools protocol: evaluate, wait for, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self._ids)
        await self.ws.send_json({"id": call, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == call:
                if "error" in data:
                    raise AssertionError(f"{method}: {data['error']}")
                result: dict[str, Any] = data["result"]
                return result
        raise AssertionError("the browser closed the DevTools connection")

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, message: str = "") -> Any:
        # While a navigation commits there is no document yet: not there yet, not an error.
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        return await eventually(lambda: self.eval(guarded), timeout=timeout, interval=0.05,
                                message=message or expression)

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile and one blank tab, stopped by its PID only."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="rt-chromium-")
    try:
        proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--remote-debugging-port={port}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as session:
                async def tab() -> str | None:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/json") as r:
                            targets = await r.json(content_type=None)
                    except aiohttp.ClientError:
                        return None
                    return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)

                ws_url = await eventually(tab, timeout=20, interval=0.1, message="chromium's DevTools endpoint")
                async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.send("Page.enable")
                    yield page
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        await remove_profile(Path(profile))


async def remove_profile(profile: Path) -> None:
    """Chromium's helper processes may still write to the profile for a moment after the browser
    process exited: remove it, and try again while they do."""
    for _ in range(50):
        shutil.rmtree(profile, ignore_errors=True)
        if not profile.exists():
            return
        await asyncio.sleep(0.1)
    shutil.rmtree(profile)   # still there after 5 s: say why


def rows(table: str) -> str:
    """JS: the rendered rows of ``table`` as lists of cell texts, keyed by the row's data attribute."""
    return (f"Object.fromEntries([...document.querySelectorAll('#{table} tbody tr[data-{table_key(table)}]')]"
            f".map(tr => [tr.dataset.{table_key(table).replace('-', '')}, [...tr.cells].map(td => td.textContent)]))")


def table_key(table: str) -> str:
    return {"functions": "function", "runtimes": "runtime", "schedules": "schedule", "dead-letters": "seq"}[table]


async def dead_letters(js: JetStreamContext) -> int:
    return int((await js.stream_info(DLQ_STREAM)).state.messages)


async def test_dashboard_shows_the_fleet_and_replays_a_dead_letter(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path], nc: NATS,
        js: JetStreamContext, scratch: Path, tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    proc = runtime_process(EXAMPLES, extra=["--manifests", str(manifest_dir(fixable=FIXABLE, held=HELD)),
                                            "--http", http], env={"RUNTIME_TRUST": "tests"})
    await proc.wait_ready()
    try:
        for name in ("Ada", "Grace", "Linus"):
            reply = await nc.request("fn.call.hello", json.dumps({"name": name}).encode(), timeout=10)
            assert json.loads(reply.data)["greeting"] == f"Hello, {name}!"
        await js.publish("fn.invoke.fixable", json.dumps({"item": "<b>widget</b>", "quantity": 2}).encode())
        await eventually(lambda: dead_letters(js), message="the dead letter of fixable")
        (scratch / "fixed").touch()   # from now on fixable succeeds, and held holds its slot
        for order in range(3):
            await js.publish("fn.invoke.held", json.dumps({"order": order}).encode())

        async with browser() as page:
            await page.open(f"http://{http}/")
            await page.wait_for("document.documentElement.dataset.renderedAt", message="the first render")
            functions = await page.wait_for(
                f"(r => r.held && r.held[4] === '2' && r.held[5] === '1' && r)({rows('functions')})",
                message="held: 2 queued, 1 in flight")
            names = {p.stem for p in EXAMPLES.glob("*.yaml")} - {"heartbeat"}   # heartbeat is a schedule
            assert names <= functions.keys(), functions
            assert functions["hello"][1] == "serving" and functions["hello"][2] == "1"   # status, revision
            assert functions["hello"][3] == "4"                  # its manifest's concurrency
            assert functions["fixable"][9] == "1"                # one dead letter
            runtimes = await page.eval(rows("runtimes"))
            assert len(runtimes) == 1 and str(proc.pid) in next(iter(runtimes.values()))[2]
            schedules = await page.eval(rows("schedules"))
            assert {"heartbeat", "nightly-digest"} <= schedules.keys()
            assert schedules["nightly-digest"][4] not in ("-", "disabled")   # a next fire time
            letters = await page.eval(rows("dead-letters"))
            [(seq, letter)] = letters.items()
            assert letter[1] == "fixable" and "no stock of <b>widget</b>" in letter[3]   # as text, not HTML
            assert await page.eval("document.querySelectorAll('#dead-letters b').length") == 0

            shot = tmp_path / "dashboard.png"
            await page.screenshot(shot)
            shutil.copy(shot, SCREENSHOT)

            # A user clicks "Replay" and says yes: the page posts, re-renders, and the letter is gone.
            clicked = await page.eval(f"""(() => {{
                window.confirm = question => (window.asked = question, true);
                document.querySelector('#dead-letters button[data-action=replay][data-seq="{seq}"]').click();
                return window.asked; }})()""")
            assert clicked == f"Replay dead letter {seq} of fixable?"
            await page.wait_for(f"!document.querySelector('#dead-letters tr[data-seq=\"{seq}\"]')",
                                message="the replayed dead letter gone from the page")
            assert "replayed as message" in await page.eval("document.getElementById('banner').textContent")
            assert await dead_letters(js) == 0
            await page.wait_for(f"{rows('functions')}.fixable[9] === '0'", message="fixable: no dead letters")
    finally:
        (scratch / "release").touch()
        # Stopped here, while ``release`` is there: the scratch directory goes before the fixture
        # would stop the runtime, and a held call started meanwhile would wait out its timeout.
        await asyncio.to_thread(proc.stop)


async def test_dashboard_renders_fifty_functions_within_a_second(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path], tmp_path: Path) -> None:
    many = {f"fn{i:02d}": f"name: fn{i:02d}\nhandler: functions.hello:main\n" for i in range(50)}
    http = f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(**many), extra=["--http", http])
    await proc.wait_ready()
    async with browser() as page:
        await page.open(f"http://{http}/")   # the first load warms the browser's own caches
        await page.wait_for("document.documentElement.dataset.renderedAt")
        await page.open(f"http://{http}/?again")
        rendered = float(await page.wait_for("document.documentElement.dataset.renderedAt"))
        functions = await page.eval(rows("functions"))
        assert sorted(functions) == sorted(many)
        print(f"50 functions rendered {rendered:.0f} ms after navigation")
        assert rendered < 1000, f"rendered after {rendered:.0f} ms"


def test_chromium_dump_dom_shows_the_page_without_the_devtools_driver(tmp_path: Path) -> None:
    """The page is whole without a network (no CDN): chromium opens it from a file, its script runs."""
    page = tmp_path / "dashboard.html"
    page.write_text((ROOT / "runtime" / "dashboard.html").read_text())
    with tempfile.TemporaryDirectory(prefix="rt-chromium-") as profile:
        out = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                              "--virtual-time-budget=2000", page.as_uri()],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert 'id="functions"' in out and "cannot load the overview" in out
    assert "<script src" not in out and "<link" not in out

