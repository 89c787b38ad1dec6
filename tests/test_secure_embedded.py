"""``runtime secure init`` and ``runtime serve --secure``: generated credentials, certificates and
roles, and an embedded server that serves them over TLS (real subprocesses, real nats-server)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.exitcodes import RET_AUTH, RET_OK
from runtime.secure import prepare
from runtime.server import find_binary, free_port
from runtime.settings import Settings

from .conftest import ROOT, RuntimeProcess

CONNECTION_VARIABLES = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_NKEY", "NATS_CREDS",
                        "NATS_CERT", "NATS_KEY", "NATS_CA", "NATS_TLS_FIRST", "NATS_INBOX_PREFIX")


def runtime_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in CONNECTION_VARIABLES}
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secrets_in(directory: Path) -> list[str]:
    return [p.read_text().strip() for p in directory.glob("*.password")]


def test_secure_init_writes_private_credentials_and_a_valid_config(tmp_path: Path) -> None:
    directory = tmp_path / "secure"
    result = runtime_cli("secure", "init", str(directory), "--caller", "alice=hello,payroll")
    assert result.returncode == RET_OK, result.stderr
    for name in ("ca.pem", "server-cert.pem", "runtime-cert.pem", "deployer-cert.pem", "alice-cert.pem", "nats.conf"):
        assert (directory / name).is_file(), name
    private = [*directory.glob("*-key.pem"), *directory.glob("*.password"), directory / "passwords.conf"]
    assert len(private) == 1 + 4 + 3 + 1   # CA, server and three users' keys; three passwords
    assert all(mode(p) == 0o600 for p in private), {p.name: oct(mode(p)) for p in private}
    assert mode(directory) == 0o700
    passwords = secrets_in(directory)
    assert not any(secret in result.stdout + result.stderr for secret in passwords)
    assert f"--user alice --tlsca {directory / 'ca.pem'}" in result.stdout
    assert "fn.invoke.payroll" in (directory / "nats.conf").read_text()
    checked = subprocess.run([find_binary(), "-c", str(directory / "nats.conf"), "-t"], capture_output=True,
                             text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Run again: what exists is kept (the server and clients in use go on working).
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "nats.conf"}
    again = runtime_cli("secure", "init", str(directory), "--caller", "alice=hello,payroll")
    assert again.returncode == RET_OK, again.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "nats.conf"} == before


def test_secure_refuses_a_server_url() -> None:
    result = runtime_cli("serve", "--secure", "--server", "nats://127.0.0.1:1")
    assert result.returncode != RET_OK
    assert "--secure" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def secure_runtime(tmp_path: Path) -> Iterator[tuple[RuntimeProcess, Path, int]]:
    """``runtime serve --secure`` on a free port, serving hello."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "hello.yaml").write_text("name: hello\nhandler: functions.hello:main\n")
    port = free_port()
    data = tmp_path / "data"
    proc = RuntimeProcess(None, manifests, tmp_path / "serve.log",
                          ["--secure", "--data-dir", str(data), "--port", str(port)])
    try:
        deadline = time.monotonic() + 20
        while "runtime ready" not in proc.output():
            assert proc.proc.poll() is None and time.monotonic() < deadline, proc.output()
            time.sleep(0.05)
        yield proc, data / "secure", port
    finally:
        proc.stop()


def test_serve_secure_serves_a_caller_over_tls_and_refuses_anonymous_connections(
        secure_runtime: tuple[RuntimeProcess, Path, int]) -> None:
    proc, secure, port = secure_runtime
    url = f"tls://127.0.0.1:{port}"
    printed = proc.output()
    assert f"runtime invoke hello '{{\"name\": \"Ada\"}}' --server {url} --user caller --tlsca {secure / 'ca.pem'}" \
        in printed
    assert not any(secret in printed for secret in secrets_in(secure))

    invoked = runtime_cli("invoke", "hello", '{"name": "Ada"}', "--server", url, "--user", "caller",
                          "--tlsca", str(secure / "ca.pem"), "--tlscert", str(secure / "caller-cert.pem"),
                          "--tlskey", str(secure / "caller-key.pem"), "--inbox-prefix", "_INBOX.caller",
                          env={"NATS_PASSWORD": (secure / "caller.password").read_text().strip()})
    assert invoked.returncode == RET_OK, invoked.stderr
    assert "Hello, Ada!" in invoked.stdout

    started = time.monotonic()
    anonymous = runtime_cli("ls", "--server", f"nats://127.0.0.1:{port}")
    assert anonymous.returncode == RET_AUTH, anonymous.stderr
    assert time.monotonic() - started < 5
    assert "runtime: error:" in anonymous.stderr


def test_serve_secure_generates_once_and_reuses_after(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", port=free_port())
    first, layout, url = prepare(settings)
    second, _, _ = prepare(settings)
    assert url == f"tls://127.0.0.1:{settings.port}"
    assert first.connect == second.connect and first.connect.user == "runtime"
    assert first.nats_conf == layout.conf == tmp_path / "data" / "secure" / "nats.conf"
    assert layout.user("caller").functions == ("hello",)
