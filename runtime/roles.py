"""Least-privilege roles on a NATS server: what ``runtime``, a ``deployer`` and each ``caller`` may
publish and subscribe to, and the ``nats.conf`` that grants it.

Every subject a role needs is listed here and nowhere else: ``render`` turns the roles into the
server configuration (``deploy/secure/nats.conf`` is its output for ``EXAMPLE``), and the README
explains the same lists subject by subject. The runtime's streams and buckets are named by the
modules that own them, so a new one shows up here as a name to place.

Each user gets its own reply prefix, ``_INBOX.<user>``: a user subscribes to its own replies
only (start it with ``--inbox-prefix _INBOX.<user>``). A caller's call ids start with
``<user>.`` (``Client(id_prefix="alice.")``), so the outcomes of its calls are stored under
``$KV.fn_results.<user>.>`` and it may read those and no others.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .protocol import ACK_PREFIX, INVOKE_PREFIX, QUEUED_PREFIX, SLOT_PREFIX, kv_stream, kv_subject
from .status import STATUS_SUBJECT
from .streams import (
    CACHE_BUCKET,
    CRON_BUCKET,
    DELAYED_PREFIX,
    DELAYED_STREAM,
    DLQ_BODIES_BUCKET,
    DLQ_PREFIX,
    DLQ_STREAM,
    ERRORS_BUCKET,
    EVENTS_STREAM,
    INVOKE_STREAM,
    MANIFESTS_BUCKET,
    RATE_BUCKET,
    RESULTS_BUCKET,
    SLOTS_STREAM,
    TRIGGERS_STREAM,
)

Role = Literal["runtime", "deployer", "caller"]

ACCOUNT = "FN"
INBOX = "_INBOX"
CALL_PREFIX = "fn.call."      # micro endpoints: fn.call.<function>
SERVICE_PREFIX = "$SRV."      # micro discovery: $SRV.PING / INFO / STATS[.<service>[.<id>]]
FLOW_CONTROL_PREFIX = "$JS.FC."
API = "$JS.API."
RESERVED_NAMES = frozenset({"runtime", "deployer"})
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

RESULTS_STREAM = kv_stream(RESULTS_BUCKET)
ERRORS_STREAM = kv_stream(ERRORS_BUCKET)
MANIFESTS_STREAM = kv_stream(MANIFESTS_BUCKET)
CRON_STREAM = kv_stream(CRON_BUCKET)
CACHE_STREAM = kv_stream(CACHE_BUCKET)
RATE_STREAM = kv_stream(RATE_BUCKET)
DLQ_BODIES_STREAM = f"OBJ_{DLQ_BODIES_BUCKET}"

# Every stream a runtime creates (streams.provision_base); it may manage these and no other.
RUNTIME_STREAMS = (INVOKE_STREAM, DELAYED_STREAM, SLOTS_STREAM, DLQ_STREAM, EVENTS_STREAM, RESULTS_STREAM,
                   ERRORS_STREAM, MANIFESTS_STREAM, CRON_STREAM, DLQ_BODIES_STREAM, CACHE_STREAM, RATE_STREAM,
                   TRIGGERS_STREAM)


# ------------------------------------------------------------------ JetStream API subjects

def stream_api(stream: str, *verbs: str) -> list[str]:
    """``$JS.API.STREAM.<verb>.<stream>`` for each verb (INFO, CREATE, UPDATE, PURGE, MSG.GET, MSG.DELETE)."""
    return [f"{API}STREAM.{verb}.{stream}" for verb in verbs]


def direct_get(stream: str, subject: str | None = None) -> list[str]:
    """Direct gets from ``stream``: by sequence or request body, and by last message on a subject
    (``subject`` given: that subject or filter only, as ``$JS.API.DIRECT.GET.<stream>.<subject>``)."""
    if subject is not None:
        return [f"{API}DIRECT.GET.{stream}.{subject}"]
    return [f"{API}DIRECT.GET.{stream}", f"{API}DIRECT.GET.{stream}.>"]


def consumer_api(stream: str, *verbs: str, consumer: str = "*") -> list[str]:
    """Consumer requests on ``stream``. Verbs: ``CREATE`` (ephemeral, nameless and named forms),
    ``DURABLE.CREATE``, ``INFO``, ``DELETE``, ``MSG.NEXT`` (pull), ``LIST``, ``NAMES``, ``PAUSE``."""
    subjects: list[str] = []
    for verb in verbs:
        if verb in ("LIST", "NAMES"):
            subjects.append(f"{API}CONSUMER.{verb}.{stream}")
        elif verb == "CREATE":
            subjects += [f"{API}CONSUMER.CREATE.{stream}", f"{API}CONSUMER.CREATE.{stream}.>"]
        else:
            subjects.append(f"{API}CONSUMER.{verb}.{stream}.{consumer}")
    return subjects


def ack(stream: str) -> str:
    """Acknowledging what a consumer of ``stream`` delivered (``$JS.ACK.<stream>.<consumer>...``)."""
    return f"{ACK_PREFIX}{stream}.>"


def flow_control(stream: str) -> str:
    """Flow-control replies of ordered consumers (KV watches, object reads) on ``stream``."""
    return f"{FLOW_CONTROL_PREFIX}{stream}.>"


def inbox(user: str) -> str:
    """The reply prefix of ``user``: its clients take ``--inbox-prefix`` set to this."""
    return f"{INBOX}.{user}"


# ------------------------------------------------------------------ roles

@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to (``deny`` wins over ``allow``)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()

    def revoked(self, *, publish: Iterable[str] = (), subscribe: Iterable[str] = ()) -> Permissions:
        """The same permissions with more subjects denied."""
        return Permissions(self.publish, self.subscribe, (*self.publish_deny, *publish),
                           (*self.subscribe_deny, *subscribe))

    def conf(self) -> dict[str, dict[str, list[str]]]:
        block: dict[str, dict[str, list[str]]] = {}
        for key, allow, deny in (("publish", self.publish, self.publish_deny),
                                 ("subscribe", self.subscribe, self.subscribe_deny)):
            rules = {"allow": list(allow)}
            if deny:
                rules["deny"] = list(deny)
            block[key] = rules
        return block


def _unique(subjects: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def runtime_permissions(user: str = "runtime") -> Permissions:
    """A runtime process: its own streams and buckets, the functions' subjects, answers to callers."""
    publish: list[str] = [f"{API}INFO"]
    for stream in RUNTIME_STREAMS:
        # Created and kept in shape at start; never deleted (an operator's decision).
        publish += stream_api(stream, "INFO", "CREATE", "UPDATE", "MSG.GET", "MSG.DELETE")
        publish += direct_get(stream)
        publish += consumer_api(stream, "CREATE", "DURABLE.CREATE", "INFO", "DELETE", "MSG.NEXT", "LIST", "NAMES")
    publish += stream_api(DLQ_BODIES_STREAM, "PURGE")  # an object store replaces an object's chunks so
    publish += [
        ack(INVOKE_STREAM), ack(SLOTS_STREAM), ack(EVENTS_STREAM), ack(TRIGGERS_STREAM),
        f"{API}STREAM.LIST",        # a trigger finds the stream that captures its subject
        flow_control(MANIFESTS_STREAM), flow_control(CRON_STREAM), flow_control(DLQ_BODIES_STREAM),
        f"{INVOKE_PREFIX}>",        # cron ticks and handlers' own calls (ctx.invoke)
        f"{DELAYED_PREFIX}>",       # handlers' delayed calls
        f"{SLOT_PREFIX}>",          # concurrency slots
        f"{DLQ_PREFIX}>",           # dead letters
        kv_subject(RESULTS_BUCKET, ">"), kv_subject(ERRORS_BUCKET, ">"),
        kv_subject(MANIFESTS_BUCKET, ">"),  # serve --manifests deploys what it is given
        kv_subject(CRON_BUCKET, ">"), f"$O.{DLQ_BODIES_BUCKET}.>",
        kv_subject(CACHE_BUCKET, ">"), kv_subject(RATE_BUCKET, ">"),   # result cache, rate limits
        f"{INBOX}.>",               # answers, on whatever inbox a caller's reply subject names
    ]
    subscribe = [
        f"{CALL_PREFIX}>", f"{SERVICE_PREFIX}>", STATUS_SUBJECT, f"{QUEUED_PREFIX}>", f"{inbox(user)}.>",
    ]
    return Permissions(_unique(publish), _unique(subscribe))


def deployer_permissions(user: str = "deployer") -> Permissions:
    """``runtime deploy / undeploy / rollback / history / ls / schedules``, ``runtime dlq ls / show /
    purge`` and ``runtime queue ls / purge``; it publishes no invocation, so it cannot invoke (nor
    replay a dead letter: that is an invocation)."""
    publish: list[str] = [f"{API}INFO", STATUS_SUBJECT]
    # The registry: read, watched and written.
    publish += stream_api(MANIFESTS_STREAM, "INFO", "MSG.GET")
    publish += direct_get(MANIFESTS_STREAM)
    publish += consumer_api(MANIFESTS_STREAM, "CREATE", "INFO", "DELETE")
    publish += [kv_subject(MANIFESTS_BUCKET, ">"), flow_control(MANIFESTS_STREAM)]
    # Schedules' last and next fires.
    publish += stream_api(CRON_STREAM, "INFO")
    publish += direct_get(CRON_STREAM)
    publish += consumer_api(CRON_STREAM, "CREATE", "INFO", "DELETE")
    publish += [flow_control(CRON_STREAM)]
    # A deployed function's consumers and slots exist before any runtime serves it.
    publish += stream_api(INVOKE_STREAM, "INFO", "MSG.GET", "PURGE")
    publish += direct_get(INVOKE_STREAM)
    publish += consumer_api(INVOKE_STREAM, "DURABLE.CREATE", "INFO", "DELETE", "LIST", "NAMES", "PAUSE")
    publish += [f"{QUEUED_PREFIX}>"]   # runtime queue resume rings for the calls that waited
    publish += stream_api(SLOTS_STREAM, "INFO", "MSG.GET", "MSG.DELETE")
    publish += consumer_api(SLOTS_STREAM, "DURABLE.CREATE", "INFO")
    publish += [f"{SLOT_PREFIX}>"]
    publish += stream_api(DELAYED_STREAM, "INFO")
    # A deployed trigger's consumer, on FN_TRIGGERS (which captures its subject) or on a user's stream.
    publish += [f"{API}STREAM.LIST"]
    publish += stream_api(TRIGGERS_STREAM, "INFO", "CREATE", "UPDATE")
    publish += consumer_api(TRIGGERS_STREAM, "CREATE", "DURABLE.CREATE", "INFO", "DELETE", "LIST", "NAMES")
    # Dead letters: listed, shown (with their stored bodies) and purged.
    publish += stream_api(DLQ_STREAM, "INFO", "MSG.GET", "MSG.DELETE", "PURGE")
    publish += direct_get(DLQ_STREAM)
    publish += consumer_api(DLQ_STREAM, "CREATE", "INFO", "DELETE", "MSG.NEXT")
    publish += stream_api(DLQ_BODIES_STREAM, "INFO", "MSG.GET", "PURGE")
    publish += direct_get(DLQ_BODIES_STREAM)
    publish += consumer_api(DLQ_BODIES_STREAM, "CREATE", "INFO", "DELETE")
    publish += [flow_control(DLQ_BODIES_STREAM), f"$O.{DLQ_BODIES_BUCKET}.>"]
    return Permissions(_unique(publish), (f"{inbox(user)}.>",))


def caller_permissions(user: str, functions: Sequence[str]) -> Permissions:
    """A caller of ``functions``: invoke them (now, at a priority level, later, or as a micro request),
    receive its replies, and read the outcomes of its own calls (ids starting with ``<user>.``)."""
    publish: list[str] = []
    for function in functions:
        publish += [
            f"{INVOKE_PREFIX}{function}",              # at the function's own priority level
            f"{INVOKE_PREFIX}{function}.*",            # at level 1 to 10
            f"{DELAYED_PREFIX}{function}.*",           # a delayed call (submit(delay=...))
            f"{CALL_PREFIX}{function}",                # the micro endpoint (request/reply)
            # The client checks a function is deployed before it sends anything.
            *direct_get(MANIFESTS_STREAM, kv_subject(MANIFESTS_BUCKET, function)),
            *consumer_api(INVOKE_STREAM, "INFO", consumer=function),
        ]
    publish += direct_get(RESULTS_STREAM, kv_subject(RESULTS_BUCKET, f"{user}.>"))
    subscribe = (f"{inbox(user)}.>", kv_subject(RESULTS_BUCKET, f"{user}.>"))
    return Permissions(_unique(publish), subscribe)


@dataclass(frozen=True)
class User:
    """One user of the account: a name, a role and, for a caller, the functions it may invoke."""

    name: str
    role: Role
    functions: tuple[str, ...] = ()
    permissions: Permissions | None = field(default=None, compare=False)  # instead of the role's own

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"user name {self.name!r}: lower-case letters, digits, '_' and '-', "
                             "starting with a letter (it becomes a subject token)")
        if self.role == "caller" and self.name in RESERVED_NAMES:
            raise ValueError(f"a caller cannot be named {self.name!r}: that inbox belongs to a role")
        if self.role != "caller" and self.functions:
            raise ValueError(f"only a caller is given functions, not the {self.role} {self.name!r}")
        for function in self.functions:
            if not _NAME.match(function) or "-" in function:
                raise ValueError(f"{function!r} is not a function name")

    @property
    def password_variable(self) -> str:
        """The nats.conf variable (or environment variable) holding this user's password."""
        return re.sub(r"[^A-Z0-9]", "_", self.name.upper()) + "_PASSWORD"

    @property
    def inbox_prefix(self) -> str:
        return inbox(self.name)

    @property
    def id_prefix(self) -> str:
        """The call id prefix of a caller (``Client(id_prefix=...)``)."""
        return f"{self.name}."

    def granted(self) -> Permissions:
        if self.permissions is not None:
            return self.permissions
        if self.role == "runtime":
            return runtime_permissions(self.name)
        if self.role == "deployer":
            return deployer_permissions(self.name)
        return caller_permissions(self.name, self.functions)


EXAMPLE = (User("runtime", "runtime"), User("deployer", "deployer"), User("caller", "caller", ("hello",)))
"""The users of ``deploy/secure/nats.conf``: a runtime, a deployer, and a caller of ``hello``."""


# ------------------------------------------------------------------ nats.conf

@dataclass(frozen=True)
class TlsFiles:
    """Where the server finds its certificate, key and the CA that signs clients' certificates."""

    cert: Path
    key: Path
    ca: Path
    verify: bool = True   # clients must present a certificate the CA signed (mutual TLS)

    @classmethod
    def in_directory(cls, directory: Path, verify: bool = True) -> TlsFiles:
        return cls(directory / "server-cert.pem", directory / "server-key.pem", directory / "ca.pem", verify)


def _value(value: object) -> str:
    # nats.conf reads JSON values, so quoting subjects (with their $ and >) is json's job.
    return json.dumps(value)


def render(users: Sequence[User] = EXAMPLE, *, tls: TlsFiles | None = None,
           passwords_file: str | None = None) -> str:
    """The ``nats.conf`` granting ``users`` their roles in account ``FN`` (JetStream on).

    Passwords are variables (``$RUNTIME_PASSWORD``...): nats-server takes them from
    ``passwords_file`` when given (included, relative to the configuration), else from its
    environment. Nothing else can connect: the account has no anonymous user.
    """
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"user names must be distinct: {names}")
    lines = [
        "# Least-privilege roles for nats-fn-runtime, generated by runtime.roles (see README, Security).",
        "# Users: " + ", ".join(f"{u.name} ({u.role}{': ' + ', '.join(u.functions) if u.functions else ''})"
                                for u in users),
        "# Each user subscribes to its replies under _INBOX.<user>: connect with --inbox-prefix _INBOX.<user>.",
    ]
    if passwords_file is not None:
        lines += [f"include {_value(passwords_file)}"]
    else:
        lines += ["# Passwords come from the environment: " + ", ".join(f"${u.password_variable}" for u in users)
                  + " (or from an included file, as 'runtime secure init' writes)."]
    if tls is not None:
        lines += [
            "",
            "tls {",
            f"  cert_file: {_value(str(tls.cert))}",
            f"  key_file: {_value(str(tls.key))}",
            f"  ca_file: {_value(str(tls.ca))}",
            f"  verify: {'true' if tls.verify else 'false'}",
            "  timeout: 2",
            "}",
        ]
    lines += ["", "accounts {", f"  {ACCOUNT} {{", "    jetstream: enabled", "    users: ["]
    for user in users:
        lines += [f"      # {user.name}: {user.role}" + (f" of {', '.join(user.functions)}" if user.functions else ""),
                  "      {", f"        user: {_value(user.name)}", f"        password: ${user.password_variable}",
                  "        permissions: {"]
        permissions = user.granted().conf()
        for direction in ("publish", "subscribe"):
            lines.append(f"          {direction}: {{")
            for verdict, subjects in permissions[direction].items():
                lines.append(f"            {verdict}: [")
                lines += [f"              {_value(subject)}" for subject in subjects]
                lines.append("            ]")
            lines.append("          }")
        lines += ["        }", "      }"]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def example_path(root: Path) -> Path:
    return root / "deploy" / "secure" / "nats.conf"


EXAMPLE_TLS = TlsFiles.in_directory(Path("/etc/nats/secure"))
"""Where the committed example expects the files ``runtime secure init /etc/nats/secure`` writes."""


def render_example() -> str:
    """``deploy/secure/nats.conf`` as committed."""
    return render(EXAMPLE, tls=EXAMPLE_TLS)
