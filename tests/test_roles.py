"""The least-privilege roles (runtime.roles) on a real nats-server: a real ``runtime serve`` as the
runtime user, the CLI and ``Client`` as callers and the deployer, each allowed what its role says
and refused the rest with one line and exit code 11."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime import Client
from runtime.errors import PermissionDenied
from runtime.exitcodes import RET_OK, RET_PERMISSION
from runtime.roles import EXAMPLE, EXAMPLE_TLS, User, example_path, render, render_example, runtime_permissions
from runtime.secure import PASSWORDS_CONF, SecureLayout, generate
from runtime.server import EmbeddedServer, find_binary, free_port

from .conftest import ROOT, RuntimeProcess, eventually

USERS = (User("runtime", "runtime"), User("deployer", "deployer"),
         User("alice", "caller", ("hello",)), User("bob", "caller", ("hello", "payroll")))
MANIFESTS = {
    "hello": "name: hello\nhandler: functions.hello:main\nconcurrency: 2\n",
    "payroll": "name: payroll\nhandler: functions.hello:main\nconcurrency: 1\n",
}
CONNECTION_VARIABLES = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_NKEY", "NATS_CREDS",
                        "NATS_CERT", "NATS_KEY", "NATS_CA", "NATS_TLS_FIRST", "NATS_INBOX_PREFIX")


@dataclass
class Deployment:
    """A nats-server with the roles' config (no TLS: that is tested apart) and a runtime serving on it."""

    layout: SecureLayout
    conf: Path
    server: EmbeddedServer
    runtime: RuntimeProcess
    manifests: Path

    @property
    def url(self) -> str:
        return self.server.url

    def cli(self, user: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``runtime ARGS`` as ``user``: credentials in the environment, never on the command line."""
        env = {k: v for k, v in os.environ.items() if k not in CONNECTION_VARIABLES}
        env.update(NATS_URL=self.url, NATS_USER=user, NATS_PASSWORD=self.layout.password(user),
                   NATS_INBOX_PREFIX=self.layout.user(user).inbox_prefix, PYTHONUNBUFFERED="1")
        return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def client(self, user: str) -> Client:
        who = self.layout.user(user)
        return Client(self.url, user=user, password=self.layout.password(user), inbox_prefix=who.inbox_prefix,
                      id_prefix=who.id_prefix)

    def server_log(self) -> str:
        return (self.server.data_dir / "nats-server.log").read_text(errors="replace")


def write_conf(layout: SecureLayout, users: tuple[User, ...] = USERS) -> Path:
    conf = layout.directory / "plain.conf"
    conf.write_text(render(users, passwords_file=PASSWORDS_CONF))
    return conf


def wait_ready(proc: RuntimeProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while "runtime ready" not in proc.output():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"runtime not ready (exit {proc.proc.poll()}):\n{proc.output()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One server and runtime for the module's tests: each starts in seconds, not tenths."""
    with deploy(tmp_path_factory.mktemp("roles")) as started:
        yield started


@contextlib.contextmanager
def deploy(base: Path) -> Iterator[Deployment]:
    layout = generate(base / "secure", USERS)
    conf = write_conf(layout)
    manifests = base / "manifests"
    manifests.mkdir()
    for name, text in MANIFESTS.items():
        (manifests / f"{name}.yaml").write_text(text)
    server = EmbeddedServer(base / "nats", port=free_port(), config=conf)
    server.start_sync()
    runtime = RuntimeProcess(server.url, manifests, base / "runtime.log",
                             ["--user", "runtime", "--inbox-prefix", "_INBOX.runtime"],
                             env={"NATS_PASSWORD": layout.password("runtime")})
    try:
        wait_ready(runtime)
        yield Deployment(layout, conf, server, runtime, manifests)
    finally:
        runtime.stop()
        server.stop_sync(discard=True)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------ the rendered configuration


def test_the_committed_example_is_the_rendering_of_the_roles() -> None:
    assert example_path(ROOT).read_text() == render_example(), "regenerate deploy/secure/nats.conf"


def test_the_example_is_a_valid_server_configuration(tmp_path: Path) -> None:
    # The committed example reads its passwords from the environment.
    env = {**os.environ, **{user.password_variable: "x" for user in EXAMPLE}}
    conf = tmp_path / "nats.conf"
    conf.write_text(render(EXAMPLE))   # the example without its /etc paths
    checked = subprocess.run([find_binary(), "-c", str(conf), "-t"], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert str(EXAMPLE_TLS.cert) in render_example()


def test_a_caller_is_granted_its_own_functions_replies_and_results_only() -> None:
    alice = User("alice", "caller", ("hello",)).granted()
    assert "fn.invoke.hello" in alice.publish and "fn.invoke.hello.*" in alice.publish
    assert "fn.call.hello" in alice.publish and "fn.delayed.hello.*" in alice.publish
    assert not any("payroll" in s or (s.endswith(">") and "fn_results.alice" not in s) for s in alice.publish)
    assert alice.subscribe == ("_INBOX.alice.>", "$KV.fn_results.alice.>")
    assert "$JS.API.DIRECT.GET.KV_fn_results.$KV.fn_results.alice.>" in alice.publish


def test_a_deployer_publishes_no_invocation() -> None:
    deployer = User("deployer", "deployer").granted()
    assert not [s for s in deployer.publish if s.startswith(("fn.invoke", "fn.call", "fn.delayed", "$KV.fn_results"))]


def test_names_that_would_break_the_layout_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be named"):
        User("runtime", "caller", ("hello",))
    with pytest.raises(ValueError, match="user name"):
        User("Alice.x", "caller")
    with pytest.raises(ValueError, match="distinct"):
        render((User("alice", "caller"), User("alice", "caller")))


# ------------------------------------------------------------------ callers


def test_a_caller_invokes_its_function_from_the_cli(deployment: Deployment) -> None:
    result = deployment.cli("alice", "invoke", "hello", '{"name": "Ada"}')
    assert result.returncode == RET_OK, result.stderr
    assert "Hello, Ada!" in result.stdout


def test_a_caller_invoking_another_function_is_denied_in_one_line(deployment: Deployment) -> None:
    started = time.monotonic()
    result = deployment.cli("alice", "invoke", "payroll", '{"name": "Ada"}')
    elapsed = time.monotonic() - started
    assert result.returncode == RET_PERMISSION, result.stderr
    line = one_line(result)
    assert line.startswith("runtime: error: permission denied: publish to"), line
    assert "payroll" in line
    assert elapsed < 5


async def test_a_caller_invokes_from_python_and_is_denied_the_rest(deployment: Deployment) -> None:
    async with deployment.client("alice") as fn:
        assert await fn.invoke("hello", {"name": "Grace"}) == {"greeting": "Hello, Grace!"}
        # At a level no call used before: the runtime, as its role allows, makes that level's consumer.
        assert await fn.invoke("hello", {"name": "Ada"}, priority=9, timeout=10) == {"greeting": "Hello, Ada!"}
        call = await fn.submit("hello", {"name": "later"})
        assert call.id.startswith("alice.")
        assert await fn.result(call.id, wait=10) == {"greeting": "Hello, later!"}
        async with asyncio.timeout(5):
            with pytest.raises(PermissionDenied, match="permission denied"):
                await fn.invoke("payroll", {"name": "Grace"})


@pytest.mark.parametrize("command", [["dlq", "ls"], ["deploy", "MANIFESTS"], ["ls"]])
def test_a_caller_cannot_read_dead_letters_or_the_registry(deployment: Deployment, command: list[str]) -> None:
    args = [str(deployment.manifests / "hello.yaml") if a == "MANIFESTS" else a for a in command]
    result = deployment.cli("alice", *args)
    assert result.returncode == RET_PERMISSION, result.stdout + result.stderr
    assert one_line(result).startswith("runtime: error: permission denied:")


async def test_a_caller_cannot_read_another_callers_result(deployment: Deployment) -> None:
    async with deployment.client("bob") as bob, deployment.client("alice") as alice:
        call = await bob.submit("hello", {"name": "Bob"})
        assert await bob.result(call.id, wait=10) == {"greeting": "Hello, Bob!"}
        async with asyncio.timeout(5):
            with pytest.raises(PermissionDenied):
                await alice.result(call.id)


def test_the_runtime_serves_every_function_to_a_caller_allowed_to_call_it(deployment: Deployment) -> None:
    for name in ("hello", "payroll"):
        result = deployment.cli("bob", "invoke", name, '{"name": "Bob"}')
        assert result.returncode == RET_OK, result.stderr
        assert "Hello, Bob!" in result.stdout
    assert "Violation" not in "".join(line for line in deployment.server_log().splitlines() if "user:runtime" in line)


async def test_a_caller_reaches_the_micro_endpoint_of_its_function(deployment: Deployment) -> None:
    async with deployment.client("alice") as fn:
        reply = await fn.nc.request("fn.call.hello", b'{"name": "micro"}', timeout=5)
        assert b"Hello, micro!" in reply.data


# ------------------------------------------------------------------ the deployer


def test_the_deployer_deploys_and_lists_dead_letters(deployment: Deployment, tmp_path: Path) -> None:
    manifest = tmp_path / "greet.yaml"
    manifest.write_text("name: greet\nhandler: functions.hello:main\n")
    deployed = deployment.cli("deployer", "deploy", str(manifest))
    assert deployed.returncode == RET_OK, deployed.stderr
    listed = deployment.cli("deployer", "dlq", "ls")
    assert listed.returncode == RET_OK, listed.stderr
    functions = deployment.cli("deployer", "ls")
    assert functions.returncode == RET_OK, functions.stderr
    assert "greet" in functions.stdout and "payroll" in functions.stdout
    history = deployment.cli("deployer", "history", "hello")
    assert history.returncode == RET_OK, history.stderr
    for command in (["schedules"], ["queue", "ls"], ["dlq", "purge", "--all", "--yes"], ["queue", "pause", "greet"],
                    ["queue", "resume", "greet"]):
        result = deployment.cli("deployer", *command)
        assert result.returncode == RET_OK, (command, result.stderr)


def test_the_deployer_cannot_invoke(deployment: Deployment) -> None:
    result = deployment.cli("deployer", "invoke", "hello", '{"name": "x"}')
    assert result.returncode == RET_PERMISSION, result.stderr
    assert one_line(result).startswith("runtime: error: permission denied: publish to"), result.stderr


# ------------------------------------------------------------------ a permission lost at run time


async def test_a_runtime_that_loses_a_permission_logs_it_and_serves_the_rest(tmp_path: Path) -> None:
    with deploy(tmp_path) as deployment:
        runtime = User("runtime", "runtime", permissions=runtime_permissions().revoked(
            publish=["$JS.API.CONSUMER.MSG.NEXT.FN.payroll"]))
        deployment.conf.write_text(render((runtime, *USERS[1:]), passwords_file=PASSWORDS_CONF))
        assert deployment.server.proc is not None
        os.kill(deployment.server.proc.pid, signal.SIGHUP)
        await eventually(lambda: "Reloaded server configuration" in deployment.server_log(), timeout=5,
                         message="the server to reload its configuration")
        async with deployment.client("bob") as fn:
            await fn.submit("payroll", {"name": "nobody"})
            await eventually(lambda: "msg.next.fn.payroll" in deployment.runtime.output().lower(), timeout=10,
                             message="the runtime to log the refused pull")
            assert await fn.invoke("hello", {"name": "still"}, timeout=10) == {"greeting": "Hello, still!"}
        assert deployment.runtime.proc.poll() is None
        logged = [line for line in deployment.runtime.output().splitlines() if "msg.next.fn.payroll" in line.lower()]
        assert "permission" in logged[0].lower(), logged

