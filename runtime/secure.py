"""Credentials and certificates for the least-privilege roles: what ``runtime secure init DIR`` and
``runtime serve --secure`` write.

One directory holds a CA (``ca.pem``, its key ``ca-key.pem``), a server certificate for
localhost and 127.0.0.1, a client certificate per user (``<user>-cert.pem``, ``<user>-key.pem``),
a random password per user (``<user>.password``), ``passwords.conf`` (the same passwords as
nats.conf variables) and ``nats.conf`` (``roles.render``). Keys and passwords are written with
mode 0600. Generation is idempotent: what exists is kept, so running it again only adds what is
missing (a new user) and renders nats.conf again.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .connection import ConnectOptions
from .roles import EXAMPLE, TlsFiles, User, render
from .settings import Settings

SERVER_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825
PASSWORDS_CONF = "passwords.conf"


@dataclass(frozen=True)
class SecureLayout:
    """The files of one generated directory, and how each user connects with them."""

    directory: Path
    users: tuple[User, ...]

    @property
    def conf(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles.in_directory(self.directory)

    def user(self, name: str) -> User:
        for user in self.users:
            if user.name == name:
                return user
        raise KeyError(f"no user {name!r} in {self.directory}")

    def password_file(self, name: str) -> Path:
        return self.directory / f"{name}.password"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}-cert.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}-key.pem"

    def password(self, name: str) -> str:
        return self.password_file(name).read_text().strip()

    def options(self, name: str) -> ConnectOptions:
        """How user ``name`` connects: its password, its certificate, the CA, its reply prefix."""
        user = self.user(name)
        return ConnectOptions.model_validate({
            "user": name, "password": self.password(name), "tls_cert": self.cert(name),
            "tls_key": self.key(name), "tls_ca": self.ca, "inbox_prefix": user.inbox_prefix})

    def command(self, name: str, command: str, url: str) -> str:
        """``runtime COMMAND`` as user ``name``: the shell reads the password from its file into
        ``NATS_PASSWORD`` (a secret on the command line would show in ``ps``)."""
        return (f'NATS_PASSWORD="$(cat {self.password_file(name)})" runtime {command} --server {url} '
                f"--user {name} --tlsca {self.ca} --tlscert {self.cert(name)} --tlskey {self.key(name)} "
                f"--inbox-prefix {self.user(name).inbox_prefix}")

    def client(self, name: str, url: str) -> str:
        """The ``Client(...)`` of user ``name`` in Python."""
        user = self.user(name)
        return (f"Client({url!r}, user={name!r}, password=Path({str(self.password_file(name))!r}).read_text()"
                f".strip(), tls_ca={str(self.ca)!r}, tls_cert={str(self.cert(name))!r}, "
                f"tls_key={str(self.key(name))!r}, inbox_prefix={user.inbox_prefix!r}, id_prefix={user.id_prefix!r})")


# ------------------------------------------------------------------ files

def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, from the first byte (no window at 0644)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# ------------------------------------------------------------------ certificates

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nats-fn-runtime"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name(f"nats-fn-runtime CA {directory.name}")
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
           hosts: Sequence[str] = (), client: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = _now()
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                            crl_sign=False, content_commitment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _load_ca(layout: SecureLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if layout.ca.exists() and layout.ca_key.exists():
        cert = x509.load_pem_x509_certificate(layout.ca.read_bytes())
        key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{layout.ca_key} is not the EC key this command writes")
        return cert, key
    cert, key = _make_ca(layout.directory)
    _write_private(layout.ca_key, _key_pem(key))
    _write_public(layout.ca, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _ensure_pair(cert_path: Path, key_path: Path, make: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
                 ) -> None:
    if make is None:
        return
    cert, key = make
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


# ------------------------------------------------------------------ generation

def generate(directory: Path, users: Sequence[User] = EXAMPLE, *, hosts: Sequence[str] = SERVER_HOSTS,
             verify_clients: bool = True) -> SecureLayout:
    """Write (or complete) ``directory``: CA, certificates, passwords and nats.conf for ``users``."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    layout = SecureLayout(directory, tuple(users))
    fresh_ca = not layout.ca.exists() or not layout.ca_key.exists()
    ca, ca_key = _load_ca(layout)
    tls = layout.tls

    def missing(*paths: Path) -> bool:
        return fresh_ca or not all(p.exists() for p in paths)

    if missing(tls.cert, tls.key):
        _ensure_pair(tls.cert, tls.key, _issue(ca, ca_key, hosts[0], hosts=hosts))
    for user in users:
        if missing(layout.cert(user.name), layout.key(user.name)):
            _ensure_pair(layout.cert(user.name), layout.key(user.name), _issue(ca, ca_key, user.name, client=True))
        if not layout.password_file(user.name).exists():
            _write_private(layout.password_file(user.name), (secrets.token_urlsafe(24) + "\n").encode())
    variables = "".join(f"{user.password_variable}: {json.dumps(layout.password(user.name))}\n" for user in users)
    _write_private(directory / PASSWORDS_CONF, variables.encode())
    _write_private(layout.conf, render(users, tls=TlsFiles.in_directory(directory, verify_clients),
                                       passwords_file=PASSWORDS_CONF).encode())
    return layout


def usage(layout: SecureLayout, url: str, *, start_server: bool = True) -> str:
    """How to start nats-server with ``layout`` and how each role connects (no secret in it)."""
    lines: list[str] = []
    if start_server:
        lines += ["Start nats-server with these roles (JetStream on):",
                  f"  nats-server -c {layout.conf} -js -sd {layout.directory.parent / 'jetstream'}", ""]
    for user in layout.users:
        if user.role == "runtime":
            lines += [f"Serve functions as {user.name}:",
                      "  " + layout.command(user.name, "serve -m manifests", url)]
        elif user.role == "deployer":
            lines += [f"Deploy and read dead letters as {user.name}:",
                      "  " + layout.command(user.name, "deploy manifests", url),
                      "  " + layout.command(user.name, "dlq ls", url)]
        else:
            first = user.functions[0] if user.functions else "NAME"
            lines += [f"Invoke {', '.join(user.functions) or 'nothing yet'} as {user.name}:",
                      "  " + layout.command(user.name, f"invoke {first} '{{\"name\": \"Ada\"}}'", url),
                      "  " + layout.client(user.name, url)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ runtime serve --secure

def secure_users(functions: Sequence[str]) -> tuple[User, ...]:
    """The roles of ``runtime serve --secure``: a caller of the functions it was started with."""
    return (User("runtime", "runtime"), User("deployer", "deployer"),
            User("caller", "caller", tuple(sorted(functions)) or ("hello",)))


def prepare(settings: Settings) -> tuple[Settings, SecureLayout, str]:
    """Generate (or reuse) ``<data-dir>/secure`` and the settings that serve with it as ``runtime``.

    Returns the settings, the layout, and the URL clients use (TLS on loopback).
    """
    from .manifest import ManifestSet

    functions = list(ManifestSet.load(settings.manifests).functions) if settings.manifests else []
    hosts = tuple(dict.fromkeys((*SERVER_HOSTS, settings.host))) if settings.host not in ("0.0.0.0", "::") \
        else SERVER_HOSTS
    layout = generate(settings.data_dir / "secure", secure_users(functions), hosts=hosts)
    url = f"tls://127.0.0.1:{settings.port}"
    return settings.model_copy(update={"nats_conf": layout.conf, "connect": layout.options("runtime")}), layout, url


async def serve_secure(settings: Settings, stop: asyncio.Event) -> None:
    """``runtime serve --secure``: the embedded server with ``settings.nats_conf`` (the roles, TLS)
    and a runtime connected to it over TLS as ``runtime``, until ``stop`` is set."""
    from .app import serve
    from .server import EmbeddedServer
    from .signals import capture_signals

    with capture_signals(stop):
        server = EmbeddedServer(settings.data_dir, port=settings.port, host=settings.host,
                                config=settings.nats_conf)
        await server.start()
        try:
            if not stop.is_set():
                url = f"tls://127.0.0.1:{settings.port}"
                await serve(settings.model_copy(update={"server": url}), stop, handle_signals=False, embedded=True)
        finally:
            await server.stop()
