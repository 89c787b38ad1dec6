"""The runtime, the CLI and ``Client`` against servers that require credentials or TLS.

Each server is a real nats-server (``tests/authservers.py``); the runtime and the CLI run as
subprocesses with the nats CLI's flags and environment variables, the Client in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from runtime.client import Client
from runtime.errors import AuthError, PermissionDenied
from runtime.exitcodes import RET_AUTH, RET_OK, RET_PERMISSION

from .authservers import (
    Certificates,
    NKeyServer,
    OperatorServer,
    PasswordServer,
    SecuredServer,
    TokenServer,
    User,
    permissions,
    start_operator_server,
    start_password_server,
)
from .conftest import ROOT, RuntimeProcess, collect, eventually


@dataclass(frozen=True)
class Access:
    """How each part connects to one secured server: CLI flags, environment, Client keywords."""

    url: str
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    client: tuple[tuple[str, object], ...] = ()
    secrets: tuple[str, ...] = ()

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.env)


def password_access(server: PasswordServer) -> Access:
    # The password travels in the environment, as the README advises (arguments show in ps).
    return Access(server.url, ("--user", server.user), (("NATS_PASSWORD", server.password),),
                  (("user", server.user), ("password", server.password)), (server.password,))


def nkey_access(server: NKeyServer) -> Access:
    seed = server.seed_file.read_text().strip()
    return Access(server.url, ("--nkey", str(server.seed_file)), (), (("nkey", server.seed_file),), (seed,))


def creds_access(server: OperatorServer) -> Access:
    return Access(server.url, (), (("NATS_CREDS", str(server.creds_file)),), (("creds", server.creds_file),))


def mtls_access(server: SecuredServer) -> Access:
    certs = server.certificates
    assert certs is not None
    return Access(server.url, ("--tlsca", str(certs.ca_file), "--tlscert", str(certs.client_cert),
                               "--tlskey", str(certs.client_key)), (),
                  (("tls_ca", certs.ca_file), ("tls_cert", certs.client_cert), ("tls_key", certs.client_key)))


async def cli(access: Access, *args: str, env: dict[str, str] | None = None,
              flags: tuple[str, ...] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    environ.update({**access.environ, **(env or {})})
    cmd = [sys.executable, "-m", "runtime", *args, "--server", access.url, *(access.flags if flags is None else flags)]
    # In a thread: the Client under test shares this event loop.
    return await asyncio.to_thread(subprocess.run, cmd, cwd=ROOT, capture_output=True, text=True, timeout=30,
                                   env=environ)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[list[RuntimeProcess]]:
    procs: list[RuntimeProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


async def start_runtime(access: Access, procs: list[RuntimeProcess], tmp_path: Path) -> RuntimeProcess:
    env = {"NATS_URL": "", **access.environ}
    for name in [k for k in os.environ if k.startswith("NATS_")]:
        env.setdefault(name, "")
    proc = RuntimeProcess(access.url, ROOT / "manifests" / "hello.yaml", tmp_path / f"runtime-{len(procs)}.log",
                          list(access.flags), env)
    procs.append(proc)
    await proc.wait_ready()
    return proc


async def serves_hello(access: Access, procs: list[RuntimeProcess], tmp_path: Path) -> None:
    """The runtime serves, the CLI and the Client call through it, and no secret reaches a log."""
    proc = await start_runtime(access, procs, tmp_path)
    result = await cli(access, "invoke", "hello", '{"name": "Ada"}')
    assert result.returncode == 0, result.stderr
    assert "Hello, Ada!" in result.stdout
    async with Client(access.url, **dict(access.client)) as fn:  # type: ignore[arg-type]
        assert await fn.invoke("hello", {"name": "Bob"}) == {"greeting": "Hello, Bob!"}
    proc.stop()
    logs = proc.output() + result.stdout + result.stderr
    assert "serving hello" in logs
    for secret in access.secrets:
        assert secret not in logs


async def test_user_and_password(password_server: PasswordServer, serve: list[RuntimeProcess],
                                 tmp_path: Path) -> None:
    await serves_hello(password_access(password_server), serve, tmp_path)


async def test_password_in_the_url_is_never_shown(password_server: PasswordServer, serve: list[RuntimeProcess],
                                                  tmp_path: Path) -> None:
    access = Access(password_server.credentials_url, secrets=(password_server.password,))
    await serves_hello(access, serve, tmp_path)
    assert "alice:***@" in serve[0].output()


async def test_token(token_server: TokenServer, serve: list[RuntimeProcess], tmp_path: Path) -> None:
    access = Access(token_server.url, (), (("NATS_TOKEN", token_server.token),), (("token", token_server.token),),
                    (token_server.token,))
    await serves_hello(access, serve, tmp_path)


async def test_nkey_seed_file(nkey_server: NKeyServer, serve: list[RuntimeProcess], tmp_path: Path) -> None:
    await serves_hello(nkey_access(nkey_server), serve, tmp_path)


async def test_jwt_creds_in_operator_mode(operator_server: OperatorServer, serve: list[RuntimeProcess],
                                          tmp_path: Path) -> None:
    await serves_hello(creds_access(operator_server), serve, tmp_path)


async def test_mutual_tls(mtls_server: SecuredServer, serve: list[RuntimeProcess], tmp_path: Path) -> None:
    assert mtls_server.url.startswith("tls://")
    await serves_hello(mtls_access(mtls_server), serve, tmp_path)


async def test_tls_with_password_over_a_nats_url(certificates: Certificates, tmp_path: Path,
                                                 serve: list[RuntimeProcess]) -> None:
    """A nats:// URL upgrades to TLS when the server requires it; --tlsca makes it trusted."""
    async with start_password_server(tmp_path, tls=certificates) as server:
        base = password_access(server)
        url = server.url.replace("tls://", "nats://")
        access = Access(url, (*base.flags, "--tlsca", str(certificates.ca_file)), base.env,
                        (*base.client, ("tls_ca", certificates.ca_file)), base.secrets)
        await serves_hello(access, serve, tmp_path)


# ------------------------------------------------------------------ refusals: one line, exit 10, fast


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runtime: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


async def refused_everywhere(access: Access, tmp_path: Path, expected: str) -> None:
    """``runtime ls``, ``runtime serve`` and ``Client`` each fail at once with the same one line."""
    started = time.monotonic()
    result = await cli(access, "ls")
    assert result.returncode == RET_AUTH, result.stderr
    assert expected in one_error_line(result)
    assert time.monotonic() - started < 5

    started = time.monotonic()
    env = {**{k: "" for k in os.environ if k.startswith("NATS_")}, **access.environ}
    proc = RuntimeProcess(access.url, ROOT / "manifests" / "hello.yaml", tmp_path / "refused.log",
                          list(access.flags), env)
    try:
        assert await proc.wait_exit(timeout=10) == RET_AUTH
    finally:
        proc.stop()
    assert time.monotonic() - started < 5
    assert expected in proc.output()
    assert "Traceback" not in proc.output()

    started = time.monotonic()
    with pytest.raises(AuthError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        async with Client(access.url, **dict(access.client)):  # type: ignore[arg-type]
            pass
    assert time.monotonic() - started < 5
    for secret in access.secrets:
        assert secret not in result.stderr + proc.output()


async def test_a_wrong_password_is_one_line(password_server: PasswordServer, tmp_path: Path) -> None:
    access = Access(password_server.url, ("--user", "alice"), (("NATS_PASSWORD", "not-the-password"),),
                    (("user", "alice"), ("password", "not-the-password")), ("not-the-password",))
    await refused_everywhere(access, tmp_path, f"authentication failed: the NATS server at {password_server.url} "
                                               "refused user 'alice'")


async def test_a_missing_creds_file_is_one_line(operator_server: OperatorServer, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "alice.creds"
    access = Access(operator_server.url, ("--creds", str(missing)), (), (("creds", missing),))
    await refused_everywhere(access, tmp_path, f"creds file {missing}: no such file")


async def test_expired_creds_are_one_line(tmp_path: Path) -> None:
    async with start_operator_server(tmp_path, expires_in=-60) as server:
        access = Access(server.url, ("--creds", str(server.creds_file)), (), (("creds", server.creds_file),))
        await refused_everywhere(access, tmp_path, f"creds file {server.creds_file}: the credentials expired at")


async def test_an_untrusted_ca_is_one_line(mtls_server: SecuredServer, tmp_path: Path) -> None:
    certs = mtls_server.certificates
    assert certs is not None
    access = Access(mtls_server.url, ("--tlsca", str(certs.other_ca_file), "--tlscert", str(certs.client_cert),
                                      "--tlskey", str(certs.client_key)), (),
                    (("tls_ca", certs.other_ca_file), ("tls_cert", certs.client_cert), ("tls_key", certs.client_key)))
    await refused_everywhere(access, tmp_path, f"TLS: the certificate of the NATS server at {mtls_server.url} "
                                               f"is not trusted by {certs.other_ca_file}")


async def test_no_client_certificate_for_mutual_tls_is_one_line(mtls_server: SecuredServer, tmp_path: Path) -> None:
    certs = mtls_server.certificates
    assert certs is not None
    access = Access(mtls_server.url, ("--tlsca", str(certs.ca_file)), (), (("tls_ca", certs.ca_file),))
    result = await cli(access, "ls")
    assert result.returncode == RET_AUTH, result.stderr
    line = one_error_line(result)
    assert f"the NATS server at {mtls_server.url} requires a client certificate (--tlscert and --tlskey)" in line


async def test_a_client_certificate_from_another_ca_is_one_line(mtls_server: SecuredServer, tmp_path: Path) -> None:
    certs = mtls_server.certificates
    assert certs is not None
    access = Access(mtls_server.url, ("--tlsca", str(certs.ca_file), "--tlscert", str(certs.other_client_cert),
                                      "--tlskey", str(certs.other_client_key)), ())
    result = await cli(access, "ls")
    assert result.returncode == RET_AUTH, result.stderr
    line = one_error_line(result)
    assert f"the NATS server at {mtls_server.url} refused the client certificate {certs.other_client_cert}" in line


async def test_no_credentials_on_a_server_that_requires_them(password_server: PasswordServer) -> None:
    result = await cli(Access(password_server.url), "ls")
    assert result.returncode == RET_AUTH, result.stderr
    assert "refused no credentials" in one_error_line(result)


# ------------------------------------------------------------------ permissions: refused at once, by name

PAYROLL = """\
name: payroll
handler: functions.hello:main
"""


async def test_a_refused_publish_fails_the_call_at_once(tmp_path: Path, serve: list[RuntimeProcess]) -> None:
    bob = User("bob", permissions=permissions(publish_deny=["fn.invoke.payroll", "fn.invoke.payroll.*"]))
    carol = User("carol", permissions=permissions(subscribe_deny=["_INBOX.>"]))
    async with start_password_server(tmp_path, extra_users=[bob, carol]) as server:
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        (manifests / "payroll.yaml").write_text(PAYROLL)
        (manifests / "hello.yaml").write_text((ROOT / "manifests" / "hello.yaml").read_text())
        env = {"NATS_URL": "", "NATS_USER": "alice", "NATS_PASSWORD": server.password}
        proc = RuntimeProcess(server.url, manifests, tmp_path / "runtime.log", [], env)
        serve.append(proc)
        await proc.wait_ready()

        async with Client(server.url, user="bob", password=bob.password) as fn:
            assert await fn.invoke("hello", {"name": "Bob"}) == {"greeting": "Hello, Bob!"}
            started = time.monotonic()
            with pytest.raises(PermissionDenied) as denied:
                await fn.invoke("payroll", {"name": "Bob"}, timeout=20)
            assert time.monotonic() - started < 2
            assert denied.value.message == "permission denied: publish to fn.invoke.payroll"
            assert denied.value.code == 403 and denied.value.call_id
            assert await fn.invoke("hello", {"name": "again"}) == {"greeting": "Hello, again!"}

        as_bob = Access(server.url, ("--user", "bob"), (("NATS_PASSWORD", bob.password),))
        started = time.monotonic()
        result = await cli(as_bob, "invoke", "payroll", '{"name": "Bob"}')
        assert result.returncode == RET_PERMISSION, result.stderr
        assert one_error_line(result) == "runtime: error: permission denied: publish to fn.invoke.payroll"
        assert time.monotonic() - started < 5

        # The server says so after the fact: when the client starts, or to the first call at once.
        with pytest.raises(PermissionDenied, match=r"subscribe to _INBOX\..*give it an inbox prefix"):
            async with Client(server.url, user="carol", password=carol.password) as fn:
                await fn.invoke("hello", {"name": "Carol"}, timeout=20)
        async with Client(server.url, user="carol", password=carol.password, inbox_prefix="carol.inbox") as fn:
            assert await fn.invoke("hello", {"name": "Carol"}) == {"greeting": "Hello, Carol!"}
        for secret in (bob.password, carol.password, server.password):
            assert secret not in proc.output() + result.stderr


SLEEPY = """\
name: sleepy
handler: tests.handlers.core:sleepy
"""


async def test_a_caller_that_may_not_watch_its_outcomes_is_answered_on_its_inbox(
        tmp_path: Path, serve: list[RuntimeProcess]) -> None:
    """``Client.invoke`` reads a stored outcome as it is written (``Fn-Watches-Outcome``) where its
    user may subscribe to it; elsewhere the runtime answers on the inbox, refused late or early."""
    dana = User("dana", permissions=permissions(publish=[">"], subscribe=["_INBOX.>"]))
    erin = User("erin")   # allowed everything, until the server's configuration changes
    async with start_password_server(tmp_path, extra_users=[dana, erin]) as server:
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        (manifests / "hello.yaml").write_text((ROOT / "manifests" / "hello.yaml").read_text())
        (manifests / "sleepy.yaml").write_text(SLEEPY)
        env = {"NATS_URL": "", "NATS_USER": "alice", "NATS_PASSWORD": server.password}
        proc = RuntimeProcess(server.url, manifests, tmp_path / "runtime.log", [], env)
        serve.append(proc)
        await proc.wait_ready()

        async with Client(server.url, user="dana", password=dana.password) as fn:
            for n in range(3):
                assert await fn.invoke("hello", {"name": f"Dana{n}"}, timeout=10) == {"greeting": f"Hello, Dana{n}!"}
        as_dana = Access(server.url, ("--user", "dana"), (("NATS_PASSWORD", dana.password),))
        result = await cli(as_dana, "invoke", "hello", '{"name": "Dana"}')
        assert result.returncode == RET_OK, result.stderr
        assert "Hello, Dana!" in result.stdout

        # Refused while a call is out (the server reloads its permissions): that call reads its
        # outcome from the store, and the next ones are answered on the inbox.
        watcher = await nats.connect(server.url, user="alice", password=server.password)
        started, _ = await collect(watcher, "test.events.sleepy")
        try:
            async with Client(server.url, user="erin", password=erin.password) as fn:
                assert await fn.invoke("hello", {"name": "Erin"}) == {"greeting": "Hello, Erin!"}
                call = asyncio.ensure_future(fn.invoke("sleepy", {"seconds": 1.5}, timeout=15))
                await eventually(lambda: started, message="the slow call running")
                limited = User("erin", erin.password, permissions(publish=[">"], subscribe=["_INBOX.>"]))
                users = [u.conf() for u in {**server.users, "erin": limited}.values()]
                server.config.write_text(f"authorization: {{ users: {json.dumps(users)} }}\n")
                os.kill(server.pid, signal.SIGHUP)
                assert await asyncio.wait_for(call, 15) == {"slept": 1.5}
                assert await fn.invoke("hello", {"name": "again"}) == {"greeting": "Hello, again!"}
        finally:
            await watcher.close()
        assert "Traceback" not in proc.output()
