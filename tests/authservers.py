"""Secured nats-servers for tests: user/password, token, NKey, operator-mode JWT, TLS and mutual TLS.

Each ``start_*`` helper is an async context manager. It writes a ``nats.conf`` (and the files a
client needs: seed, creds, PEM) into a fresh directory under the one it is given, starts
nats-server with JetStream on a free loopback port (``runtime.server.EmbeddedServer``, as the
``nats_server`` fixture does), waits until the port accepts connections, yields a frozen
description of the server, and stops that process by its PID on exit. Every helper takes
``tls=`` (a ``Certificates``) to serve the same authentication over TLS, ``verify_clients=`` to
require client certificates, and ``extra_conf=`` for any other server setting.

The fixtures at the bottom give each kind in its default shape (re-exported by conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trustme

from runtime.server import EmbeddedServer, free_port

Permissions = Mapping[str, Any]
"""A nats.conf ``permissions`` block as data, e.g. ``permissions(publish=["fn.invoke.hello"])``."""


def permissions(publish: Iterable[str] = (), subscribe: Iterable[str] = (), *, publish_deny: Iterable[str] = (),
                subscribe_deny: Iterable[str] = (), allow_responses: bool = False) -> dict[str, Any]:
    """Build a ``permissions { publish { allow, deny } subscribe { allow, deny } allow_responses }`` block."""
    block: dict[str, Any] = {}
    for key, allow, deny in (("publish", publish, publish_deny), ("subscribe", subscribe, subscribe_deny)):
        rules = {name: list(subjects) for name, subjects in (("allow", allow), ("deny", deny)) if subjects}
        if rules:
            block[key] = rules
    if allow_responses:
        block["allow_responses"] = True
    return block


def _conf_value(value: Any) -> str:
    # nats.conf accepts JSON values, so quoting (and escaping) secrets and subjects is json's job.
    return json.dumps(value, indent=2)


def _secret() -> str:
    return secrets.token_urlsafe(18)


def _write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- certificates -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    """PEM files from a test CA (a server cert for 127.0.0.1/localhost, a client cert) and an unrelated CA."""

    directory: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path
    """A CA that signed nothing the servers here present: trusting only it must fail."""
    other_client_cert: Path
    """A client certificate signed by ``other_ca_file``: a mutual-TLS server must refuse it."""
    other_client_key: Path

    def client_context(self, *, ca_file: Path | None = None, client_cert: bool = True,
                       other_client: bool = False) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for ``nats.connect(tls=...)``: trusts ``ca_file`` (default: the test CA)
        and presents the client certificate (or, with ``other_client``, the untrusted one)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file or self.ca_file))
        if other_client:
            context.load_cert_chain(self.other_client_cert, self.other_client_key)
        elif client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def make_certificates(directory: Path) -> Certificates:
    """Create a CA, a server and a client certificate, and an unrelated CA with its own client cert."""
    directory = Path(tempfile.mkdtemp(prefix="certs-", dir=directory))
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.test", common_name="client")
    stranger = other.issue_cert("stranger.test", common_name="stranger")

    def pem(name: str, blob: trustme.Blob) -> Path:
        path = directory / name
        blob.write_to_path(str(path))
        path.chmod(0o600)
        return path

    return Certificates(
        directory=directory, ca_file=pem("ca.pem", ca.cert_pem),
        server_cert=pem("server-cert.pem", server.cert_chain_pems[0]),
        server_key=pem("server-key.pem", server.private_key_pem),
        client_cert=pem("client-cert.pem", client.cert_chain_pems[0]),
        client_key=pem("client-key.pem", client.private_key_pem),
        other_ca_file=pem("other-ca.pem", other.cert_pem),
        other_client_cert=pem("other-client-cert.pem", stranger.cert_chain_pems[0]),
        other_client_key=pem("other-client-key.pem", stranger.private_key_pem))


def _tls_conf(certs: Certificates | None, verify_clients: bool) -> str:
    if certs is None:
        if verify_clients:
            raise ValueError("verify_clients needs tls=Certificates")
        return ""
    block = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key),
             "ca_file": str(certs.ca_file), "verify": verify_clients, "timeout": 2}
    return f"tls: {_conf_value(block)}\n"


# --- servers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SecuredServer:
    """A running nats-server with JetStream: its URL (``tls://`` when it serves TLS) and its files."""

    url: str
    directory: Path
    config: Path
    server: EmbeddedServer
    certificates: Certificates | None

    @property
    def pid(self) -> int:
        if self.server.proc is None:
            raise RuntimeError("the server is not running")
        return self.server.proc.pid

    @property
    def log(self) -> Path:
        return self.server.data_dir / "nats-server.log"

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: this server, its credentials, no reconnects."""
        options: dict[str, Any] = {"servers": [self.url], "allow_reconnect": False, "connect_timeout": 2}
        if self.certificates is not None:
            options["tls"] = self.certificates.client_context()
        return options


@dataclass(frozen=True)
class User:
    """A user of a password server; ``permissions`` as in nats.conf (see ``permissions()``)."""

    name: str
    password: str = field(default_factory=_secret, repr=False)
    permissions: Permissions | None = None

    def conf(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"user": self.name, "password": self.password}
        if self.permissions is not None:
            entry["permissions"] = dict(self.permissions)
        return entry


@dataclass(frozen=True)
class PasswordServer(SecuredServer):
    user: str
    password: str = field(repr=False)
    users: Mapping[str, User]
    """Every user, by name (the main one included)."""

    @property
    def credentials_url(self) -> str:
        """The URL with ``user:password@`` in it."""
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{self.user}:{self.password}@{rest}"

    def connect_options(self, user: str | None = None) -> dict[str, Any]:
        chosen = self.users[user or self.user]
        return {**super().connect_options(), "user": chosen.name, "password": chosen.password}


@dataclass(frozen=True)
class TokenServer(SecuredServer):
    token: str = field(repr=False)

    def connect_options(self) -> dict[str, Any]:
        return {**super().connect_options(), "token": self.token}


@dataclass(frozen=True)
class NKeyServer(SecuredServer):
    seed_file: Path
    """The user's seed alone (``SU...``), as ``nats.connect(nkeys_seed=...)`` and ``--nkey`` read it."""
    public_key: str

    def connect_options(self) -> dict[str, Any]:
        return {**super().connect_options(), "nkeys_seed": str(self.seed_file)}


@contextlib.asynccontextmanager
async def _serve(directory: Path, kind: str, conf: str, certs: Certificates | None,
                 verify_clients: bool) -> AsyncIterator[tuple[Path, EmbeddedServer, str]]:
    """Start nats-server with ``conf`` (plus TLS) in a fresh directory; yields (directory, server, url)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=directory))
    config = workdir / "nats.conf"
    _write_secret(config, conf + _tls_conf(certs, verify_clients))
    async with EmbeddedServer(workdir / "nats", port=free_port(), config=config).discarded() as server:
        scheme = "tls" if certs is not None else "nats"
        yield workdir, server, f"{scheme}://{server.host}:{server.port}"


@contextlib.asynccontextmanager
async def start_password_server(directory: Path, *, user: str = "alice", password: str | None = None,
                                permissions: Permissions | None = None, extra_users: Iterable[User] = (),
                                tls: Certificates | None = None, verify_clients: bool = False,
                                extra_conf: str = "") -> AsyncIterator[PasswordServer]:
    """A server that requires user/password: ``user`` (random password unless given) and ``extra_users``."""
    main = User(user, password or _secret(), permissions)
    users = {u.name: u for u in (main, *extra_users)}
    conf = f"authorization: {{ users: {_conf_value([u.conf() for u in users.values()])} }}\n{extra_conf}"
    async with _serve(directory, "userpass", conf, tls, verify_clients) as (workdir, server, url):
        yield PasswordServer(url, workdir, workdir / "nats.conf", server, tls, main.name, main.password, users)


@contextlib.asynccontextmanager
async def start_token_server(directory: Path, *, token: str | None = None, tls: Certificates | None = None,
                             verify_clients: bool = False, extra_conf: str = "") -> AsyncIterator[TokenServer]:
    """A server that requires a token (random unless given)."""
    token = token or _secret()
    conf = f"authorization: {{ token: {_conf_value(token)} }}\n{extra_conf}"
    async with _serve(directory, "token", conf, tls, verify_clients) as (workdir, server, url):
        yield TokenServer(url, workdir, workdir / "nats.conf", server, tls, token)


def new_keypair(prefix: int = nkeys.PREFIX_BYTE_USER) -> Any:
    """A fresh NKey pair (``nkeys.KeyPair``) of the given role (``nkeys.PREFIX_BYTE_*``)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(keypair: Any) -> str:
    return bytes(keypair.public_key).decode()


def seed_of(keypair: Any) -> str:
    return bytes(keypair.seed).decode()


@contextlib.asynccontextmanager
async def start_nkey_server(directory: Path, *, permissions: Permissions | None = None,
                            tls: Certificates | None = None, verify_clients: bool = False,
                            extra_conf: str = "") -> AsyncIterator[NKeyServer]:
    """A server whose only user is a freshly generated NKey; its seed is written to ``user.nk``."""
    keypair = new_keypair()
    entry: dict[str, Any] = {"nkey": public_key(keypair)}
    if permissions is not None:
        entry["permissions"] = dict(permissions)
    conf = f"authorization: {{ users: {_conf_value([entry])} }}\n{extra_conf}"
    async with _serve(directory, "nkey", conf, tls, verify_clients) as (workdir, server, url):
        seed_file = _write_secret(workdir / "user.nk", seed_of(keypair) + "\n")
        yield NKeyServer(url, workdir, workdir / "nats.conf", server, tls, seed_file, public_key(keypair))


@contextlib.asynccontextmanager
async def start_tls_server(directory: Path, *, certificates: Certificates | None = None,
                           verify_clients: bool = True, extra_conf: str = "") -> AsyncIterator[SecuredServer]:
    """A server without authentication that serves TLS only; with ``verify_clients`` (default) it is
    mutual TLS and refuses clients without a certificate from the test CA."""
    certs = certificates or make_certificates(directory)
    async with _serve(directory, "tls", extra_conf, certs, verify_clients) as (workdir, server, url):
        yield SecuredServer(url, workdir, workdir / "nats.conf", server, certs)


# --- operator mode (decentralised JWT) ----------------------------------------------------------

_NO_LIMITS = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
              "conn": -1, "leaf": -1}
# JetStream is on for an account only when its JWT grants storage; -1 is "unlimited".
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# The claims the JWT id is computed over, in the order the nats.io JWT library serialises them.
_ID_CLAIMS = ("aud", "exp", "iat", "iss", "name", "nbf", "sub")


def jwt_id(claims: Mapping[str, Any]) -> str:
    """The ``jti`` the nats.io JWT library gives these claims: base32 (no padding) of SHA-512/256 over
    the compact JSON of the standard claims other than ``jti``, in library order, empty ones left out."""
    standard = {key: claims[key] for key in _ID_CLAIMS if claims.get(key)}
    return base64.b32encode(hashlib.new("sha512_256", _compact(standard)).digest()).rstrip(b"=").decode()


def encode_jwt(signer: Any, subject: str, name: str, nats: Mapping[str, Any],
               expires_in: float | None = None) -> str:
    """A NATS v2 JWT for ``subject`` with the ``nats`` claims, signed by the NKey pair ``signer``.
    A negative ``expires_in`` gives an already expired JWT."""
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "iss": public_key(signer), "name": name, "sub": subject}
    if expires_in is not None:
        claims["exp"] = int(now + expires_in)
    claims = {"jti": jwt_id(claims), **claims, "nats": {**nats, "version": 2}}
    signing_input = f"{_b64url(_compact({'typ': 'JWT', 'alg': 'ed25519-nkey'}))}.{_b64url(_compact(claims))}"
    return f"{signing_input}.{_b64url(bytes(signer.sign(signing_input.encode())))}"


def _jwt_permissions(perms: Permissions | None) -> dict[str, Any]:
    """nats.conf permissions (``publish``/``subscribe``/``allow_responses``) in user-JWT form."""
    claims: dict[str, Any] = {"pub": {}, "sub": {}}
    for conf_key, jwt_key in (("publish", "pub"), ("subscribe", "sub")):
        rules = (perms or {}).get(conf_key)
        if isinstance(rules, str | list | tuple):
            rules = {"allow": rules}
        for verdict, subjects in (rules or {}).items():
            claims[jwt_key][verdict] = [subjects] if isinstance(subjects, str) else list(subjects)
    if (perms or {}).get("allow_responses"):
        claims["resp"] = {"max": 1, "ttl": 0}
    return claims


def creds_text(user_jwt: str, seed: str) -> str:
    """The standard ``.creds`` layout (as ``nsc`` writes it) that nats-py's ``user_credentials=`` reads."""
    return (f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


def _issue_user(account_seed: str, directory: Path, name: str, expires_in: float | None,
                permissions: Permissions | None) -> tuple[Path, str]:
    """Write ``<name>.creds`` for a new user signed by the account; returns its path and public key."""
    user = new_keypair()
    nats = {**_jwt_permissions(permissions), "subs": -1, "data": -1, "payload": -1, "type": "user"}
    token = encode_jwt(nkeys.from_seed(account_seed.encode()), public_key(user), name, nats, expires_in)
    return _write_secret(directory / f"{name}.creds", creds_text(token, seed_of(user))), public_key(user)


@dataclass(frozen=True)
class OperatorServer(SecuredServer):
    """Operator mode: an operator, a system account and account ``APP`` (JetStream, no limits), whose
    JWTs the server preloads (``resolver: MEMORY``); users are JWTs signed by ``APP``'s key."""

    creds_file: Path
    user_public_key: str
    operator_public_key: str
    account_public_key: str
    system_account_public_key: str
    account_seed: str = field(repr=False)

    def issue_creds(self, name: str, *, expires_in: float | None = None,
                    permissions: Permissions | None = None) -> Path:
        """Write ``<name>.creds`` for a new user of ``APP`` (expired if ``expires_in`` < 0); the server
        needs no change, it trusts whatever the account signs."""
        return _issue_user(self.account_seed, self.directory, name, expires_in, permissions)[0]

    def connect_options(self) -> dict[str, Any]:
        return {**super().connect_options(), "user_credentials": str(self.creds_file)}


@contextlib.asynccontextmanager
async def start_operator_server(directory: Path, *, user: str = "alice", expires_in: float | None = None,
                                permissions: Permissions | None = None, tls: Certificates | None = None,
                                verify_clients: bool = False, extra_conf: str = "") -> AsyncIterator[OperatorServer]:
    """An operator-mode server and ``<user>.creds`` for a user of account ``APP``."""
    operator, system, account = (new_keypair(p) for p in (nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT,
                                                          nkeys.PREFIX_BYTE_ACCOUNT))
    preload = {
        public_key(system): encode_jwt(operator, public_key(system), "SYS", {"limits": _NO_LIMITS, "type": "account"}),
        public_key(account): encode_jwt(operator, public_key(account), "APP", {
            "limits": {**_NO_LIMITS, **_JETSTREAM}, "default_permissions": {"pub": {}, "sub": {}}, "type": "account"}),
    }
    operator_jwt = encode_jwt(operator, public_key(operator), "OP",
                              {"type": "operator", "system_account": public_key(system)})
    conf = (f"operator: {_conf_value(operator_jwt)}\nsystem_account: {_conf_value(public_key(system))}\n"
            f"resolver: MEMORY\nresolver_preload: {_conf_value(preload)}\n{extra_conf}")
    async with _serve(directory, "operator", conf, tls, verify_clients) as (workdir, server, url):
        creds, user_key = _issue_user(seed_of(account), workdir, user, expires_in, permissions)
        yield OperatorServer(url, workdir, workdir / "nats.conf", server, tls, creds, user_key, public_key(operator),
                             public_key(account), public_key(system), seed_of(account))


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    """Test CA, server and client PEM files, plus an unrelated CA."""
    return make_certificates(tmp_path)


@pytest.fixture
async def password_server(tmp_path: Path) -> AsyncIterator[PasswordServer]:
    """A user/password server: user ``alice`` with a random password."""
    async with start_password_server(tmp_path) as server:
        yield server


@pytest.fixture
async def token_server(tmp_path: Path) -> AsyncIterator[TokenServer]:
    async with start_token_server(tmp_path) as server:
        yield server


@pytest.fixture
async def nkey_server(tmp_path: Path) -> AsyncIterator[NKeyServer]:
    async with start_nkey_server(tmp_path) as server:
        yield server


@pytest.fixture
async def operator_server(tmp_path: Path) -> AsyncIterator[OperatorServer]:
    """Operator mode; ``creds_file`` holds user ``alice`` of account ``APP``."""
    async with start_operator_server(tmp_path) as server:
        yield server


@pytest.fixture
async def tls_server(certificates: Certificates, tmp_path: Path) -> AsyncIterator[SecuredServer]:
    """TLS with a server certificate only: clients need to trust the test CA, nothing more."""
    async with start_tls_server(tmp_path, certificates=certificates, verify_clients=False) as server:
        yield server


@pytest.fixture
async def mtls_server(certificates: Certificates, tmp_path: Path) -> AsyncIterator[SecuredServer]:
    """Mutual TLS: clients need to trust the test CA and present a client certificate it signed."""
    async with start_tls_server(tmp_path, certificates=certificates, verify_clients=True) as server:
        yield server
