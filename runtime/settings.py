"""Runtime settings: one frozen object, from CLI options and the environment."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from .connection import ConnectOptions
from .durations import Duration
from .errors import ConfigError, format_problems, validation_problems
from .trust import check_prefix

DEFAULT_HTTP = "127.0.0.1:9090"
HTTP_OFF = frozenset({"off", "none", "no", "false", "0", ""})


def parse_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[::1]:9090`` for IPv6); ValueError saying what is wrong."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise ValueError(f"{text!r} is not an HTTP listen address: give HOST:PORT such as {DEFAULT_HTTP} "
                         f"(port 1-65535), or off")
    return host, int(port)


class Settings(BaseModel):
    """How a runtime connects, where it stores data, and how it shuts down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server: str | None = None                 # None: start the embedded nats-server
    connect: ConnectOptions = ConnectOptions()  # credentials and TLS for the server
    host: str = "127.0.0.1"                   # embedded server address
    port: int = 4222
    data_dir: Path = Path(".runtime")
    nats_conf: Path | None = None
    manifests: tuple[Path, ...] = ()
    project_root: Path = Field(default_factory=Path.cwd)
    grace: Duration = 30.0                    # in-flight work gets this long on shutdown
    results_ttl: Duration = 86400.0
    dlq_retention: Duration = 30 * 86400.0
    # Copies of every stream and bucket the runtime owns (1, or 3 on a three-node cluster).
    replicas: int = Field(default=1, ge=1, le=5)
    # At most this many invocations stored per function and priority level (None: no limit).
    max_queued: int | None = Field(default=None, ge=1, le=2**62)
    # Callers may be answered only on reply subjects under these prefixes (none: any that is not
    # a system or API subject, see wire.ReplyPolicy).
    reply_prefixes: tuple[str, ...] = ()
    # Handler modules imported only under these prefixes, besides ``functions`` and the packages of
    # ``manifests`` (see trust.py): the registry alone cannot make a runtime import any module.
    trust: tuple[str, ...] = ()
    gateway: bool = True                      # fn.call.<name> micro endpoints
    dead_letters: bool = True                 # the advisory-driven dead-letter mover
    scheduler: bool = True                    # cron schedules
    # HOST:PORT of /healthz, /readyz and /metrics (http.py); "off"; None: DEFAULT_HTTP when the
    # embedded server is used (and skipped with a warning if that port is taken), off otherwise.
    http: str | None = None
    # Required as ``Authorization: Bearer`` on that listener, but for the probes and metrics (None: open).
    http_token: SecretStr | None = None
    http_max_body: int = Field(default=1024 * 1024, ge=1)   # bytes of an HTTP request body (413 beyond)

    @field_validator("reply_prefixes")
    @classmethod
    def _check_prefixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            if not prefix or prefix.startswith("$") or any(c.isspace() or c in "*>" for c in prefix):
                raise ValueError(f"{prefix!r} is not a reply subject prefix (such as _INBOX.)")
        return value

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.strip().lower() in HTTP_OFF:
            return "off"
        host, port = parse_address(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def http_address(self, embedded: bool) -> tuple[str, int, bool] | None:
        """Where to serve the probes and metrics: ``(host, port, required)``; None when off.

        ``required`` is False for the default address, which is given up (with a warning) if taken.
        """
        if self.http == "off" or (self.http is None and not embedded):
            return None
        return (*parse_address(self.http or DEFAULT_HTTP), self.http is not None)

    @field_validator("trust")
    @classmethod
    def _check_trust(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_prefix(prefix) for prefix in value)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``NATS_URL`` / ``RUNTIME_DATA_DIR`` / ``RUNTIME_GRACE`` / ``RUNTIME_REPLY_PREFIX``
        (comma-separated) / ``RUNTIME_MAX_QUEUED`` / ``RUNTIME_REPLICAS`` / ``RUNTIME_TRUST`` (comma-separated) /
        ``RUNTIME_HTTP`` / ``RUNTIME_HTTP_TOKEN`` / ``RUNTIME_HTTP_MAX_BODY``, then ``overrides``."""
        env: dict[str, object] = {}
        if os.environ.get("NATS_URL"):
            env["server"] = os.environ["NATS_URL"]
        if os.environ.get("RUNTIME_DATA_DIR"):
            env["data_dir"] = os.environ["RUNTIME_DATA_DIR"]
        if os.environ.get("RUNTIME_GRACE"):
            env["grace"] = os.environ["RUNTIME_GRACE"]
        if os.environ.get("RUNTIME_REPLY_PREFIX"):
            env["reply_prefixes"] = tuple(p.strip() for p in os.environ["RUNTIME_REPLY_PREFIX"].split(",") if p.strip())
        if os.environ.get("RUNTIME_MAX_QUEUED"):
            env["max_queued"] = os.environ["RUNTIME_MAX_QUEUED"]
        if os.environ.get("RUNTIME_REPLICAS"):
            env["replicas"] = os.environ["RUNTIME_REPLICAS"]
        if os.environ.get("RUNTIME_HTTP"):
            env["http"] = os.environ["RUNTIME_HTTP"]
        if os.environ.get("RUNTIME_HTTP_TOKEN"):
            env["http_token"] = os.environ["RUNTIME_HTTP_TOKEN"]
        if os.environ.get("RUNTIME_HTTP_MAX_BODY"):
            env["http_max_body"] = os.environ["RUNTIME_HTTP_MAX_BODY"]
        if os.environ.get("RUNTIME_TRUST"):
            env["trust"] = tuple(p.strip() for p in os.environ["RUNTIME_TRUST"].split(",") if p.strip())
        env.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(env)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {format_problems(validation_problems(exc))}") from None

    def default_conf(self) -> Path | None:
        if self.nats_conf is not None:
            return self.nats_conf
        candidate = self.project_root / "nats.conf"
        return candidate if candidate.exists() else None
