"""How every part of the runtime reaches NATS: credentials, TLS, and one-line errors.

``runtime serve``, every CLI command and ``Client`` take the same options (the nats CLI's flag
names and environment variables). Secrets are ``SecretStr``: they print as ``**********`` in a
repr, a log line or an error, and URLs are shown with their password replaced
(:func:`redact_url`).

A server that refuses who we are (a wrong password, an expired creds file, an untrusted
certificate) will refuse us again on every retry, so such errors end a connection attempt at once
with :class:`AuthError` instead of feeding nats-py's reconnect loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client as NATS
from nats.errors import AuthorizationError
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator

from . import consumer, direct, fastpub
from .errors import AuthError, ConfigError, format_problems, validation_problems
from .permissions import permission_denied, watch_permissions
from .permissions import permission_watch as permission_watch

# Option name -> environment variable, as the nats CLI names them.
ENVIRONMENT = {
    "user": "NATS_USER",
    "password": "NATS_PASSWORD",
    "token": "NATS_TOKEN",
    "nkey": "NATS_NKEY",
    "creds": "NATS_CREDS",
    "tls_cert": "NATS_CERT",
    "tls_key": "NATS_KEY",
    "tls_ca": "NATS_CA",
    "tls_first": "NATS_TLS_FIRST",
    "inbox_prefix": "NATS_INBOX_PREFIX",
}

# What the server says when it will not accept these credentials (nats-py passes the text on).
_REFUSALS = ("authorization violation", "authentication expired", "authentication revoked",
             "account authentication expired", "user authentication expired")
_JWT_BLOCK = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s*(\S+)\s*-{3,}END NATS USER JWT-{3,}")
_SEED_BLOCK = re.compile(r"-{3,}BEGIN USER NKEY SEED-{3,}\s*(\S+)\s*-{3,}END USER NKEY SEED-{3,}")
log = logging.getLogger("runtime.connection")


class _TLSNoise(logging.Filter):
    """asyncio warns at every TLS connection's end that nats-py's protocol returns True from
    ``eof_received``, which TLS ignores; harmless, and it would break every one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_TLSNoise())

CLOSE_FAILED_WITHIN = 0.5   # seconds

_INBOX_PREFIX = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class ConnectOptions(BaseModel):
    """Credentials and TLS for a NATS connection; everything optional (an open server needs none)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey: Path | None = None          # NKey seed file
    creds: Path | None = None         # JWT credentials file (user JWT + seed)
    tls_cert: Path | None = None      # client certificate, for mutual TLS
    tls_key: Path | None = None
    tls_ca: Path | None = None        # CA that signed the server's certificate
    tls_first: bool = False           # TLS before the server's INFO (servers with handshake_first)
    inbox_prefix: str | None = None   # replies come under this prefix instead of _INBOX

    @field_validator("inbox_prefix")
    @classmethod
    def _check_inbox_prefix(cls, value: str | None) -> str | None:
        if value is not None and not _INBOX_PREFIX.match(value):
            raise ValueError(f"{value!r} is not a subject prefix (letters, digits, _ and -, separated by dots)")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ConnectOptions:
        """Options from ``NATS_USER``, ``NATS_PASSWORD``, … (see ``ENVIRONMENT``), then ``overrides``
        (``None`` values are ignored, so unset flags keep the environment's)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, variable in ENVIRONMENT.items():
            if env.get(variable):
                values[field] = env[variable]
        values.update({k: v for k, v in overrides.items() if v is not None and v is not False})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid connection options: {format_problems(validation_problems(exc))}") from None

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_key or self.tls_first)

    def check(self) -> None:
        """Refuse options that cannot work before any connection is tried: a missing or unreadable
        file, a creds file that expired, half of a certificate pair, a user without a password."""
        if self.user is not None and self.password is None:
            raise ConfigError(f"user {self.user!r} needs a password (--password or NATS_PASSWORD)")
        if self.password is not None and self.user is None:
            raise ConfigError("a password needs a user (--user or NATS_USER)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mutual TLS needs both a client certificate (--tlscert) and its key (--tlskey)")
        if self.nkey is not None and self.creds is not None:
            raise ConfigError("give either an NKey seed file (--nkey) or a creds file (--creds), not both")
        for label, path in (("NKey seed file", self.nkey), ("creds file", self.creds),
                            ("TLS certificate", self.tls_cert), ("TLS key", self.tls_key), ("TLS CA", self.tls_ca)):
            if path is not None:
                _readable(label, path)
        if self.nkey is not None:
            _check_seed(self.nkey)
        if self.creds is not None:
            check_creds(self.creds)

    def tls_context(self, url: str) -> ssl.SSLContext | None:
        """The TLS context for ``url``: None for a plain connection with no TLS option given."""
        if not self.uses_tls and not any(u.strip().startswith("tls://") for u in url.split(",")):
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                 cafile=str(self.tls_ca) if self.tls_ca else None)
            if self.tls_cert is not None and self.tls_key is not None:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the TLS files: {_ssl_reason(exc)}") from None
        return context

    def nats_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``connect``."""
        kwargs: dict[str, Any] = {}
        if self.user is not None and self.password is not None:
            kwargs["user"] = self.user
            kwargs["password"] = self.password.get_secret_value()
        if self.token is not None:
            kwargs["token"] = self.token.get_secret_value()
        if self.nkey is not None:
            kwargs["nkeys_seed"] = str(self.nkey)
        if self.creds is not None:
            kwargs["user_credentials"] = str(self.creds)
        context = self.tls_context(url)
        if context is not None:
            kwargs["tls"] = context
            kwargs["tls_handshake_first"] = self.tls_first
        if self.inbox_prefix is not None:
            kwargs["inbox_prefix"] = self.inbox_prefix
        return kwargs

    def identity(self) -> str:
        """Who we claim to be, for an error message (never a secret)."""
        if self.creds is not None:
            return f"the credentials in {self.creds}"
        if self.nkey is not None:
            return f"the NKey in {self.nkey}"
        if self.user is not None:
            return f"user {self.user!r}"
        if self.token is not None:
            return "the token given"
        return "no credentials"


def _readable(label: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise AuthError(f"{label} {path}: no such file") from None
    except IsADirectoryError:
        raise AuthError(f"{label} {path}: is a directory") from None
    except PermissionError:
        raise AuthError(f"{label} {path}: not readable (permission denied)") from None
    except OSError as exc:
        raise AuthError(f"{label} {path}: cannot read it ({exc.strerror or exc})") from None


def _check_seed(path: Path) -> None:
    import nkeys

    text = path.read_text(errors="replace")
    seed = _SEED_BLOCK.search(text)
    raw = (seed.group(1) if seed else text.strip().splitlines()[0] if text.strip() else "").strip()
    try:
        nkeys.from_seed(bytearray(raw.encode()))
    except Exception:
        raise AuthError(f"NKey seed file {path}: does not hold an NKey seed (a line starting with 'SU')") from None


def check_creds(path: Path, now: float | None = None) -> None:
    """A creds file must hold a user JWT and a seed, and the JWT must not have expired."""
    text = path.read_text(errors="replace")
    jwt = _JWT_BLOCK.search(text)
    if jwt is None or _SEED_BLOCK.search(text) is None:
        raise AuthError(f"creds file {path}: not a NATS credentials file (needs a user JWT and an NKey seed)")
    claims = _jwt_claims(jwt.group(1))
    if claims is None:
        raise AuthError(f"creds file {path}: its JWT cannot be read")
    expires = claims.get("exp")
    if isinstance(expires, int | float) and expires > 0 and expires <= (time.time() if now is None else now):
        when = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise AuthError(f"creds file {path}: the credentials expired at {when}; ask for new ones")


def _jwt_claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    body = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(body))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


# ------------------------------------------------------------------ URLs and errors


def server_list(url: str) -> list[str]:
    """The servers of ``url``: one URL, or several separated by commas (as the nats CLI takes them).

    nats-py connects to one of them and, when that one goes away, reconnects to any other.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ConfigError(f"{url!r} names no NATS server")
    return servers


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list) with any password or token in it replaced by ``***``."""
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    stripped = url.strip()
    if "@" not in stripped:
        return stripped
    try:
        parts = urlsplit(stripped if "://" in stripped else f"nats://{stripped}")
    except ValueError:
        return "<a URL that cannot be parsed>"
    host = parts.netloc.rsplit("@", 1)[1]
    if parts.password is not None:
        userinfo = f"{parts.username}:***"
    else:
        userinfo = "***"   # a token in the URL
    redacted = urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))
    return redacted if "://" in stripped else redacted.split("://", 1)[1]


def refusal(exc: BaseException, url: str, options: ConnectOptions,
            server_info: Mapping[str, Any] | None = None) -> AuthError | None:
    """The one-line error for a connection error that retrying cannot cure; None for the others.

    ``server_info`` is the server's INFO when it was read: a server that verifies client
    certificates (``tls_verify``) and then drops the connection refused ours (with TLS 1.3 that
    shows as a reset rather than a TLS alert, depending on timing).
    """
    where = redact_url(url)
    if isinstance(exc, ConnectionResetError | BrokenPipeError) and (server_info or {}).get("tls_verify"):
        if options.tls_cert is None:
            return AuthError(f"the NATS server at {where} requires a client certificate (--tlscert and --tlskey)")
        return AuthError(f"the NATS server at {where} refused the client certificate {options.tls_cert}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = " (pass the CA that signed it with --tlsca)" if options.tls_ca is None else f" by {options.tls_ca}"
        return AuthError(f"TLS: the certificate of the NATS server at {where} is not trusted{hint}: "
                         f"{exc.verify_message or _ssl_reason(exc)}")
    if isinstance(exc, ssl.SSLError):
        reason = _ssl_reason(exc)
        if "certificate required" in reason and options.tls_cert is None:
            return AuthError(f"the NATS server at {where} requires a client certificate (--tlscert and --tlskey)")
        if options.tls_cert is not None and any(a in reason for a in ("unknown ca", "bad certificate",
                                                                      "certificate unknown")):
            return AuthError(f"the NATS server at {where} refused the client certificate {options.tls_cert} "
                             f"({reason})")
        return AuthError(f"TLS handshake with the NATS server at {where} failed: {reason}")
    text = str(exc).lower()
    if isinstance(exc, AuthorizationError) or any(r in text for r in _REFUSALS):
        expired = "expired" in text
        what = "expired" if expired else "refused"
        return AuthError(f"authentication failed: the NATS server at {where} {what} {options.identity()}"
                         + ("" if expired else " (wrong password, token, key or credentials?)"))
    if "secure connection" in text and "tls required" in text:
        return AuthError(f"the NATS server at {where} requires TLS: use a tls:// URL and --tlsca")
    return None


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------ connecting

ErrorCallback = Callable[[Exception], Awaitable[None]]


async def open_connection(url: str, options: ConnectOptions | None = None, *,
                          error_cb: ErrorCallback | None = None, **kwargs: Any) -> NATS:
    """Connect to ``url`` with ``options``; ``kwargs`` go to nats-py (callbacks, reconnect policy).

    Raises ``ConfigError`` for options that cannot work and ``AuthError`` when the server refuses
    our credentials or certificate, as soon as that happens (however many reconnect attempts
    ``kwargs`` allow); other failures are nats-py's.
    """
    options = options or ConnectOptions()
    options.check()
    refused: list[AuthError] = []
    connecting = True
    on_reconnected = kwargs.pop("reconnected_cb", None)

    async def on_reconnect() -> None:
        if on_reconnected is not None:
            await on_reconnected()
        # What follows the connection (pull feeds, callers waiting for outcomes) catches up now.
        consumer.reconnected(nc)

    async def on_error(exc: Exception) -> None:
        if connecting:
            found = refusal(exc, url, options, getattr(nc, "_server_info", None))
            if found is not None:
                refused.append(found)
                # nats-py's connect loop re-raises the error right after this callback instead of
                # trying again (which would be refused again).
                nc.options["allow_reconnect"] = False
                return
        denied = permission_denied(exc)
        if denied is not None:
            watch.notify(denied)
        if error_cb is not None:
            await error_cb(denied or exc)

    nc = NATS()
    direct.read_headers_faster(nc)
    direct.hand_over_faster(nc)
    direct.parse_messages_faster(nc)
    fastpub.pings_in_order(nc)
    watch = watch_permissions(nc)
    try:
        await nc.connect(server_list(url), error_cb=on_error, reconnected_cb=on_reconnect,
                         **options.nats_kwargs(url), **kwargs)
    except Exception as exc:
        await _close_quietly(nc)
        found = refused[0] if refused else refusal(exc, url, options)
        if found is not None:
            raise found from None
        raise
    finally:
        connecting = False
    return nc


async def _close_quietly(nc: NATS) -> None:
    """Close a connection that never opened. Bounded: after a failed TLS handshake the socket is
    closed already, but nats-py would wait forever for the plain stream under it to say so."""
    try:
        await asyncio.wait_for(nc.close(), CLOSE_FAILED_WITHIN)
    except Exception:
        log.debug("closing a connection that never opened failed", exc_info=True)
