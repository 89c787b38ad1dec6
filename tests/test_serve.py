"""``runtime serve``: the embedded server, its errors, and idempotent provisioning."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nats
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType

from runtime.manifest import FunctionManifest
from runtime.server import EmbeddedServer, free_port
from runtime.streams import (
    INVOKE_STREAM,
    SLOTS_STREAM,
    ensure_consumer,
    ensure_level_consumer,
    ensure_stream,
    invoke_consumers,
    invoke_stream_config,
    provision_base,
)

from .conftest import ROOT, RuntimeProcess, eventually


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


async def test_serve_starts_the_embedded_server_and_runs_functions(
        runtime_process: Callable[..., RuntimeProcess], tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = runtime_process(ROOT / "manifests", extra=["--port", str(port), "--data-dir", str(data)], url=None)
    await proc.wait_ready()
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        js = nc.jetstream()
        await nc.publish("fn.invoke.hello", b'{"name": "Ada"}')
        await eventually(lambda: "greeting Ada" in proc.output(), message="hello to run")
        stream = await js.stream_info(INVOKE_STREAM)
        assert stream.config.retention == RetentionPolicy.WORK_QUEUE
        assert stream.config.storage == StorageType.FILE
        assert (stream.config.duplicate_window or 0) >= 120
    finally:
        await nc.close()
    assert (data / "jetstream").is_dir(), "the store lives under the data directory"
    proc.signal(2)
    assert await proc.wait_exit(20) == 0
    # The embedded server stopped with the runtime.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli("serve", "--manifests", "manifests", "--port", str(port), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port}" in lines[0] and "already in use" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in result.stderr


def test_invalid_manifest_fails_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ok\nhandler: functions.hello:main\nretry:\n  max_deliver: -2\n")
    result = run_cli("serve", "--manifests", str(bad), "--port", str(free_port()), "--data-dir",
                     str(tmp_path / "d"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"runtime: error: {bad}: retry.max_deliver: "
                                     "Input should be greater than or equal to 1")
    assert not (tmp_path / "d").exists(), "no server was started"


def test_unimportable_handler_fails_serve(tmp_path: Path) -> None:
    bad = tmp_path / "ghost.yaml"
    bad.write_text("name: ghost\nhandler: functions.ghost:main\n")
    result = run_cli("serve", "--manifests", str(bad), "--port", str(free_port()), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "cannot import module 'functions.ghost'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_provisioning_is_idempotent_and_updates_in_place(js: JetStreamContext) -> None:
    await provision_base(js)
    await provision_base(js)  # no "already exists"
    manifest = FunctionManifest.model_validate({"name": "f", "handler": "m:f", "concurrency": 2,
                                                "retry": {"max_deliver": 3}, "timeout": "10s"})
    await ensure_consumer(js, manifest)
    await ensure_consumer(js, manifest)
    changed = manifest.model_copy(update={"concurrency": 7, "timeout": 4.0,
                                          "retry": manifest.retry.model_copy(update={"max_deliver": 9})})
    await ensure_consumer(js, changed)
    info = await js.consumer_info(INVOKE_STREAM, "f")
    assert (info.config.max_ack_pending, info.config.max_deliver, info.config.ack_wait) == (7, 9, 4.0)
    # The default level (5) takes the plain subject too. Another level gets a consumer of its own
    # once a call waits there (the runtime makes it); from then on deploys keep it in line.
    assert info.config.filter_subjects == ["fn.invoke.f", "fn.invoke.f.5"]
    assert {c.name for c in await invoke_consumers(js)} == {"f"}
    await ensure_level_consumer(js, manifest, 10)
    assert (await js.consumer_info(INVOKE_STREAM, "f_L10")).config.max_deliver == 3
    await ensure_consumer(js, changed)
    urgent = await js.consumer_info(INVOKE_STREAM, "f_L10")
    assert (urgent.config.filter_subject, urgent.config.max_deliver) == ("fn.invoke.f.10", 9)
    slots = await js.stream_info(SLOTS_STREAM, subjects_filter="fn.slot.f")
    assert slots.state.subjects == {"fn.slot.f": 7}, "one slot message per unit of concurrency"
    # A new default level moves the plain subject to that level's consumer.
    await ensure_consumer(js, changed.model_copy(update={"priority": 8, "concurrency": 3}))
    assert (await js.consumer_info(INVOKE_STREAM, "f")).config.filter_subjects == ["fn.invoke.f", "fn.invoke.f.8"]
    assert {c.name for c in await invoke_consumers(js)} == {"f", "f_L10"}, "level 5 gets one when a call waits"
    slots = await js.stream_info(SLOTS_STREAM, subjects_filter="fn.slot.f")
    assert slots.state.subjects == {"fn.slot.f": 3}
    # A stream whose settings drifted is brought back in line.
    drifted = invoke_stream_config()
    drifted.duplicate_window = 30.0
    await js.update_stream(drifted)
    await ensure_stream(js, invoke_stream_config())
    assert (await js.stream_info(INVOKE_STREAM)).config.duplicate_window == 120.0


async def test_concurrent_provisioning_from_many_runtimes(js: JetStreamContext) -> None:
    await asyncio.gather(*(provision_base(js) for _ in range(5)))
    assert (await js.stream_info(INVOKE_STREAM)).config.name == INVOKE_STREAM


def test_invalid_option_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--grace", "soon", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == ("runtime: error: invalid settings: grace: 'soon' is not a duration; "
                                     "use e.g. 250ms, 30s, 5m or 1h")


async def test_a_stopped_server_keeps_its_store_and_a_discarded_one_is_killed_at_once(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name="KEPT", subjects=["kept"])
    await js.publish("kept", b"one")
    await nc.close()
    proc = server.proc
    assert proc is not None
    await server.stop()   # SIGTERM: the server saves its state and exits by itself
    assert proc.returncode == 0 and server.proc is None

    async with server.discarded():
        nc = await nats.connect(server.url)
        assert (await nc.jetstream().get_last_msg("KEPT", "kept")).data == b"one"
        await nc.close()
        proc = server.proc
        assert proc is not None
    assert proc.returncode == -signal.SIGKILL and server.proc is None
