"""The secured test servers (tests/authservers.py) let in the right credentials, JetStream included,
and turn away wrong ones: checked with raw nats-py, no project code in between."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from .authservers import (
    Certificates,
    NKeyServer,
    OperatorServer,
    PasswordServer,
    SecuredServer,
    TokenServer,
    User,
    jwt_id,
    new_keypair,
    permissions,
    seed_of,
    start_operator_server,
    start_password_server,
)
from .conftest import eventually

AUTH_VIOLATION = "Authorization Violation"


@contextlib.asynccontextmanager
async def connected(options: dict[str, Any]) -> AsyncIterator[tuple[NATS, list[Exception]]]:
    """A raw nats-py connection; yields it with the asynchronous errors the server sent it."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(**options, error_cb=on_error)
    try:
        yield nc, errors
    finally:
        await nc.close()


async def assert_jetstream(options: dict[str, Any]) -> None:
    async with connected(options) as (nc, _):
        info = await nc.jetstream().account_info()
        assert info.limits.max_streams == -1


async def refused(options: dict[str, Any], *expected: type[BaseException]) -> BaseException:
    """Connecting with ``options`` fails fast with one of ``expected``; returns the error."""
    async def on_error(exc: Exception) -> None:
        pass  # the same error is raised by connect, which the test checks

    nc = NATS()
    try:
        with pytest.raises(expected) as failure:
            async with asyncio.timeout(5):
                await nc.connect(**options, error_cb=on_error)
    finally:
        # nats-py keeps the socket of a refused first connect (allow_reconnect=False) until close();
        # after a failed client-side certificate check that close() waits forever on the old stream.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await nc.close()
    return failure.value


def denied(errors: list[Exception], subject: str) -> bool:
    """The server's -ERR for a forbidden publish reached the error callback (nats-py lower-cases it)."""
    return any(f'permissions violation for publish to "{subject}"' in str(e).lower() for e in errors)


def jwt_claims(creds: Path) -> dict[str, Any]:
    token = creds.read_text().split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0]
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def test_password_server_lets_alice_in_and_refuses_a_wrong_password(password_server: PasswordServer) -> None:
    assert password_server.user == "alice"
    await assert_jetstream(password_server.connect_options())
    await assert_jetstream({"servers": [password_server.credentials_url], "allow_reconnect": False})

    error = await refused({**password_server.connect_options(), "password": "wrong"}, nats.errors.Error)
    assert AUTH_VIOLATION in str(error)
    without = {"servers": [password_server.url], "allow_reconnect": False}
    assert AUTH_VIOLATION in str(await refused(without, nats.errors.Error))


async def test_password_server_applies_each_users_permissions(tmp_path: Path) -> None:
    caller = User("caller", permissions=permissions(publish=["fn.invoke.hello"], subscribe=["_INBOX.>"]))
    async with start_password_server(tmp_path, extra_users=[caller]) as server:
        assert set(server.users) == {"alice", "caller"}
        async with connected(server.connect_options()) as (alice, _), \
                connected(server.connect_options("caller")) as (nc, errors):
            received = await alice.subscribe("fn.invoke.>")
            # nats-py's flush() can send its PING ahead of the SUB still buffered, so alice waits
            # for a message of her own: from then on the server has her subscription.
            await alice.publish("fn.invoke.alice", b"ready")
            assert (await received.next_msg(timeout=2)).data == b"ready"
            await nc.publish("fn.invoke.payroll", b"denied")
            await nc.publish("fn.invoke.hello", b"allowed")
            await nc.flush()
            message = await received.next_msg(timeout=2)
            assert (message.subject, message.data) == ("fn.invoke.hello", b"allowed")
            await eventually(lambda: denied(errors, "fn.invoke.payroll"), timeout=2, message="the violation")


async def test_token_server_lets_the_token_in_and_refuses_another(token_server: TokenServer) -> None:
    await assert_jetstream(token_server.connect_options())
    error = await refused({**token_server.connect_options(), "token": "wrong"}, nats.errors.Error)
    assert AUTH_VIOLATION in str(error)


async def test_nkey_server_lets_its_seed_file_in_and_refuses_another_key(nkey_server: NKeyServer,
                                                                         tmp_path: Path) -> None:
    seed = nkey_server.seed_file.read_text().strip()
    assert seed.startswith("SU") and nkey_server.public_key.startswith("U")
    assert nkey_server.seed_file.stat().st_mode & 0o777 == 0o600
    await assert_jetstream(nkey_server.connect_options())

    stranger = tmp_path / "stranger.nk"
    stranger.write_text(seed_of(new_keypair()))
    error = await refused({**nkey_server.connect_options(), "nkeys_seed": str(stranger)}, nats.errors.Error)
    assert AUTH_VIOLATION in str(error)


async def test_operator_server_lets_a_user_creds_file_in_with_jetstream(operator_server: OperatorServer) -> None:
    text = operator_server.creds_file.read_text()
    assert text.startswith("-----BEGIN NATS USER JWT-----\n") and "-----BEGIN USER NKEY SEED-----\nSU" in text
    claims = jwt_claims(operator_server.creds_file)
    assert claims["iss"] == operator_server.account_public_key
    assert claims["sub"] == operator_server.user_public_key
    assert claims["nats"]["type"] == "user" and "exp" not in claims
    assert claims["jti"] == jwt_id(claims)
    await assert_jetstream(operator_server.connect_options())


def test_jwt_ids_are_computed_as_the_nats_jwt_library_computes_them() -> None:
    # The claims and id of an operator JWT issued by the Go library (nsc).
    claims = {"exp": 1781632465, "iat": 1623952465, "name": "ISecL-operator",
              "iss": "OCLCKKU3KILZ6ZD4DH3V57TJBDIGJJYLZMQ4HJQOC4REQQ2VATUM5JP5",
              "sub": "OCLCKKU3KILZ6ZD4DH3V57TJBDIGJJYLZMQ4HJQOC4REQQ2VATUM5JP5",
              "nats": {"type": "operator", "version": 2}}
    assert jwt_id(claims) == "BVAVTBG53MZ2AZI5XR4E5YOKLGNNYLN4JYXWE7OR53EPH2NSJEHA"


async def test_operator_server_refuses_expired_creds_and_accepts_fresh_ones(tmp_path: Path) -> None:
    async with start_operator_server(tmp_path, expires_in=-60) as server:
        assert jwt_claims(server.creds_file)["exp"] < time.time()
        error = await refused(server.connect_options(), nats.errors.Error)
        assert AUTH_VIOLATION in str(error)

        fresh = server.issue_creds("bob", expires_in=3600)
        await assert_jetstream({**server.connect_options(), "user_credentials": str(fresh)})


async def test_operator_creds_carry_permissions(operator_server: OperatorServer) -> None:
    caller = operator_server.issue_creds("caller", permissions=permissions(publish=["fn.invoke.hello"]))
    async with connected({**operator_server.connect_options(), "user_credentials": str(caller)}) as (nc, errors):
        await nc.publish("fn.invoke.payroll", b"denied")
        await nc.flush()
        await eventually(lambda: denied(errors, "fn.invoke.payroll"), timeout=2, message="the violation")


async def test_tls_server_needs_only_the_ca_and_refuses_an_untrusted_one(tls_server: SecuredServer,
                                                                         certificates: Certificates) -> None:
    assert tls_server.url.startswith("tls://127.0.0.1:")
    await assert_jetstream({**tls_server.connect_options(), "tls": certificates.client_context(client_cert=False)})

    untrusting = certificates.client_context(ca_file=certificates.other_ca_file, client_cert=False)
    error = await refused({**tls_server.connect_options(), "tls": untrusting}, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(error)


async def test_mutual_tls_server_requires_a_client_certificate_from_its_ca(mtls_server: SecuredServer,
                                                                           certificates: Certificates) -> None:
    await assert_jetstream(mtls_server.connect_options())

    # Under TLS 1.3 the server checks the client's certificate after the client has finished its
    # handshake, so the refusal reaches the client as an alert or as a dropped connection (OSError).
    options = mtls_server.connect_options()
    await refused({**options, "tls": certificates.client_context(client_cert=False)}, OSError)
    await refused({**options, "tls": certificates.client_context(other_client=True)}, OSError)
    untrusting = certificates.client_context(ca_file=certificates.other_ca_file)
    await refused({**options, "tls": untrusting}, ssl.SSLCertVerificationError)


async def test_authentication_and_mutual_tls_together(tmp_path: Path, certificates: Certificates) -> None:
    async with start_password_server(tmp_path, tls=certificates, verify_clients=True) as server:
        assert server.credentials_url.startswith("tls://alice:")
        await assert_jetstream(server.connect_options())
        await refused({**server.connect_options(), "password": "wrong"}, nats.errors.Error)


async def test_a_server_is_stopped_when_its_context_exits(tmp_path: Path) -> None:
    async with start_password_server(tmp_path) as server:
        pid = server.pid
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
