"""Manifests: the YAML files that declare functions and schedules, as frozen pydantic models."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import codec
from .documents import read_yaml_file, short
from .durations import Duration
from .errors import ManifestError, validation_problems
from .subjects import MAX_PATTERN, RESERVED, name_for, overlaps, pattern_problem

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
HANDLER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

# Limits on what a manifest may ask for. What ends up in a subject, a header or the server's
# configuration is refused here with its field name rather than by the server at deploy time.
MAX_NAME = 64                    # subjects, consumer names, keys
MAX_DESCRIPTION = 1024           # UTF-8 bytes; nats-server refuses consumer descriptions over 4 KiB
MAX_HANDLER = 256
MAX_CRON = 256
MAX_TIMEZONE = 64                # the longest IANA zone name is ~30 characters
MAX_PAYLOAD = 64 * 1024          # a schedule's payload as encoded JSON, published on every tick
MAX_SCHEDULES = 100
MAX_BACKOFF = 100
MAX_DURATION = 7 * 86400.0       # ack_wait goes to the server in nanoseconds (int64)
MAX_TRIGGERS = 32
MAX_STREAM_NAME = 64
STREAM_PATTERN = r"^[A-Za-z0-9_-]+$"
# Streams a trigger may not name: the runtime's own, and the ones behind buckets.
OWN_STREAM = re.compile(r"^(FN|FN_.*|KV_.*|OBJ_.*)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    """How often and how late a failing invocation runs again."""

    max_deliver: int = Field(default=3, ge=1, le=10_000)
    backoff: list[Duration] = Field(default_factory=lambda: [1.0, 10.0, 60.0], max_length=MAX_BACKOFF)

    @field_validator("backoff")
    @classmethod
    def _check_backoff(cls, value: list[float]) -> list[float]:
        for delay in value:
            _check_duration(delay)
        return value

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2 is the first retry); the last value repeats."""
        if not self.backoff or attempt < 2:
            return 0.0
        return self.backoff[min(attempt - 2, len(self.backoff) - 1)]


class ScheduleSpec(_Model):
    """A cron trigger; inside a function manifest or standalone (``kind: Schedule``)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
    cron: str = Field(max_length=MAX_CRON)
    timezone: str = Field(default="UTC", max_length=MAX_TIMEZONE)
    payload: Any = None
    catchup: Literal["none", "latest", "all"] = "latest"
    enabled: bool = True
    priority: int | None = Field(default=None, ge=1, le=10)   # None: the function's default level

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        from .crontab import to_croniter

        to_croniter(value)  # raises ValueError with the reason
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        if value.lower() in ("localtime", "posixrules"):
            # Hosts would disagree on the tick times, and so on the ticks' message ids.
            raise ValueError(f"{value!r} depends on each host's setting; name the zone (such as Europe/Paris)")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as Europe/Paris)") from exc
        return value

    @field_validator("payload")
    @classmethod
    def _check_payload(cls, value: Any) -> Any:
        # Every tick publishes this body: it must be valid JSON and fit a message with room to spare.
        try:
            body = codec.encode(value)
            json.loads(body, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise ValueError(f"cannot be sent as JSON: {exc}") from None
        if len(body) > MAX_PAYLOAD:
            raise ValueError(f"is {len(body)} bytes as JSON; at most {MAX_PAYLOAD} are allowed")
        return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _store_mode(value: Any) -> Any:
    # true and false, from before "auto" existed, keep what they said: every outcome, or none.
    return {True: "always", False: "never"}.get(value, value) if isinstance(value, bool) else value


# Which outcomes go to fn_results (see results.should_store): auto keeps those someone can ask for.
StoreResults = Annotated[Literal["auto", "always", "never"], BeforeValidator(_store_mode)]


def _check_duration(value: float | None) -> None:
    if value is not None and value > MAX_DURATION:
        raise ValueError(f"must be at most {MAX_DURATION / 86400:g} days")


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_RATE = 1_000_000


def parse_rate(value: Any) -> str:
    """``60/m`` (per ``s``, ``m`` or ``h``), written the one way the runtime reads it back."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{short(value)} is not a rate; use <count>/<s|m|h>, such as 60/m")
    count = int(match.group(1))
    if not 1 <= count <= MAX_RATE:
        raise ValueError(f"the count must be between 1 and {MAX_RATE:,}")
    return f"{count}/{match.group(2)}"


Rate = Annotated[str, BeforeValidator(parse_rate)]


class TriggerSpec(_Model):
    """Events that run a function: every message on ``subject`` (wildcards allowed), captured
    by the runtime's event stream, or by the user's existing ``stream`` when it is named."""

    subject: str = Field(max_length=MAX_PATTERN)
    stream: Annotated[str, Field(pattern=STREAM_PATTERN, max_length=MAX_STREAM_NAME)] | None = None
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)] | None = None

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, value: str) -> str:
        problem = pattern_problem(value)
        if problem:
            raise ValueError(f"{short(value)} cannot be a trigger subject: {problem}")
        return value

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, value: str | None) -> str | None:
        if value is not None and OWN_STREAM.match(value):
            raise ValueError(f"{value} is one of the runtime's own streams; name a stream of yours")
        return value

    @property
    def trigger_name(self) -> str:
        """The trigger's name (``ctx.trigger``): given, or made from the subject."""
        return self.name or name_for(self.subject)


class CachePolicy(_Model):
    """Keep successful results by input: the same input within ``ttl`` is answered without running."""

    ttl: Duration

    @field_validator("ttl")
    @classmethod
    def _check_ttl(cls, value: float) -> float:
        if value < 1:
            raise ValueError("must be at least 1s")
        _check_duration(value)
        return value


class FunctionManifest(_Model):
    """One deployable function."""

    kind: Literal["Function"] = "Function"
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
    handler: str = Field(max_length=MAX_HANDLER)
    description: str = ""
    concurrency: int = Field(default=4, ge=1, le=100_000)
    priority: int = Field(default=5, ge=1, le=10)    # the level of a plain fn.invoke.<name> (10: most urgent)
    timeout: Duration = 30.0
    ack_wait: Duration | None = None
    ttl: Duration | None = None       # an invocation still queued this long after it was stored never runs
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    encoding: Literal["json", "msgpack"] = "json"
    store_results: StoreResults = "auto"
    schedules: list[ScheduleSpec] = Field(default_factory=list, max_length=MAX_SCHEDULES)
    rate_limit: Rate | None = None    # invocation starts across all runtimes, such as 60/m
    cache: CachePolicy | None = None
    triggers: list[TriggerSpec] = Field(default_factory=list, max_length=MAX_TRIGGERS)
    output: str | None = Field(default=None, max_length=MAX_PATTERN)   # results published here as events

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from .wire import subject_problem

        problem = subject_problem(value)
        if problem is None and value.startswith(RESERVED):
            problem = "subjects starting with $, _INBOX. or fn. belong to NATS and the runtime"
        if problem:
            raise ValueError(f"{short(value)} cannot be an output subject: {problem}")
        return value

    @model_validator(mode="after")
    def _check_triggers(self) -> FunctionManifest:
        names = [t.trigger_name for t in self.triggers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"trigger names repeat: {', '.join(dupes)} (give each trigger its own name:)")
        loop = self.loop_trigger()
        if loop is not None:
            raise ValueError(loop)
        return self

    def loop_trigger(self) -> str | None:
        """Why the function's ``output`` would trigger the function itself again and again; None if it does not."""
        for trigger in self.triggers if self.output else ():
            if overlaps(trigger.subject, self.output or ""):
                return (f"output {self.output} matches the function's own trigger {trigger.trigger_name} "
                        f"({trigger.subject}): every result would run it again, without end")
        return None

    @field_validator("handler")
    @classmethod
    def _check_handler(cls, value: str) -> str:
        if not HANDLER_PATTERN.match(value):
            raise ValueError(f"{value!r} is not of the form 'package.module:attribute'")
        return value

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str) -> str:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_DESCRIPTION:
            raise ValueError(f"is {size} bytes long; at most {MAX_DESCRIPTION} are allowed")
        return value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        _check_duration(value)
        return value

    @field_validator("ack_wait")
    @classmethod
    def _check_ack_wait(cls, value: float | None) -> float | None:
        _check_duration(value)
        return value

    @field_validator("ttl")
    @classmethod
    def _check_ttl(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("must be greater than zero (leave it out for no expiry)")
        return value

    @model_validator(mode="after")
    def _check_schedules(self) -> FunctionManifest:
        names = [s.name for s in self.schedules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schedule names repeat: {', '.join(dupes)}")
        return self

    @property
    def subject(self) -> str:
        return f"fn.invoke.{self.name}"

    @property
    def start_interval(self) -> float | None:
        """Seconds between invocation starts that ``rate_limit`` asks for; None without a limit."""
        if self.rate_limit is None:
            return None
        count, _, unit = self.rate_limit.partition("/")
        return RATE_PERIODS[unit] / int(count)

    @property
    def effective_ack_wait(self) -> float:
        """The consumer's ack_wait: the timeout, kept between 1 s and 30 s unless set explicitly.

        Running invocations send in-progress acks, so ack_wait only bounds how long a message
        held by a crashed runtime waits before another runtime gets it.
        """
        if self.ack_wait is not None:
            return max(self.ack_wait, 0.1)
        return min(max(self.timeout, 1.0), 30.0)


class ScheduleManifest(ScheduleSpec):
    """A standalone schedule that triggers a function declared elsewhere."""

    kind: Literal["Schedule"]
    function: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]


class TriggerManifest(TriggerSpec):
    """A standalone trigger of a function declared elsewhere (``kind: Trigger``)."""

    kind: Literal["Trigger"]
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
    function: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]

    def spec(self) -> TriggerSpec:
        return TriggerSpec(subject=self.subject, stream=self.stream, name=self.name)


Manifest = FunctionManifest | ScheduleManifest | TriggerManifest


def with_triggers(function: FunctionManifest, standalone: Iterable[TriggerManifest]) -> FunctionManifest:
    """``function`` with the standalone triggers that target it added to its own (theirs first win
    nothing: a standalone trigger named like one of the function's own is left out)."""
    own = {t.trigger_name for t in function.triggers}
    extra = [t.spec() for t in sorted(standalone, key=lambda t: t.name)
             if t.function == function.name and t.name not in own]
    if not extra:
        return function
    return function.model_copy(update={"triggers": [*function.triggers, *extra]})


class Schedule(ScheduleSpec):
    """A schedule bound to its target function (from either manifest form)."""

    function: str
    source: str = ""

    @classmethod
    def from_spec(cls, spec: ScheduleSpec, function: str, source: str = "") -> Schedule:
        data = spec.model_dump(exclude={"kind", "function"})
        return cls(function=function, source=source, **data)


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate one manifest document; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise ManifestError(source, [("", "a manifest must be a mapping of fields")])
    kind = data.get("kind", "Function")
    model: type[FunctionManifest] | type[ScheduleManifest] | type[TriggerManifest]
    if kind == "Function":
        model = FunctionManifest
    elif kind == "Schedule":
        model = ScheduleManifest
    elif kind == "Trigger":
        model = TriggerManifest
    else:
        raise ManifestError(source, [("kind", f"unknown kind {short(kind)}; use Function, Schedule or Trigger")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, validation_problems(exc)) from None


def load_manifest(path: Path) -> Manifest:
    """Read and validate one YAML manifest file."""
    return parse_manifest(read_yaml_file(path), str(path))


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (every ``*.yaml``/``*.yml`` in a directory) in a stable order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise ManifestError(str(path), [("", "no such file or directory")])
    return files


class ManifestSet(BaseModel):
    """Functions and standalone schedules loaded together, checked for clashes."""

    model_config = ConfigDict(frozen=True)

    functions: dict[str, FunctionManifest]
    schedules: dict[str, ScheduleManifest]
    sources: dict[str, str]
    triggers: dict[str, TriggerManifest] = Field(default_factory=dict)

    @classmethod
    def load(cls, paths: Iterable[str | Path], known_functions: Iterable[str] = ()) -> ManifestSet:
        functions: dict[str, FunctionManifest] = {}
        schedules: dict[str, ScheduleManifest] = {}
        triggers: dict[str, TriggerManifest] = {}
        sources: dict[str, str] = {}
        for path in manifest_files(paths):
            manifest = load_manifest(path)
            key = f"{manifest.kind}:{manifest.name}"
            if key in sources:
                raise ManifestError(str(path), [("name", f"{manifest.name!r} is already declared in "
                                                         f"{sources[key]}")])
            sources[key] = str(path)
            if isinstance(manifest, FunctionManifest):
                functions[manifest.name] = manifest
            elif isinstance(manifest, TriggerManifest):
                triggers[manifest.name] = manifest
            else:
                schedules[manifest.name] = manifest
        result = cls(functions=functions, schedules=schedules, sources=sources, triggers=triggers)
        result.check_schedules(set(known_functions))
        result.check_triggers(set(known_functions))
        return result

    def check_triggers(self, known_functions: set[str]) -> None:
        for trigger in self.triggers.values():
            source = self.sources.get(f"Trigger:{trigger.name}", "")
            function = self.functions.get(trigger.function)
            if function is None and trigger.function not in known_functions:
                raise ManifestError(source, [("function", f"unknown function {trigger.function!r}")])
            if function is not None and trigger.name in {t.trigger_name for t in function.triggers}:
                raise ManifestError(source, [("name", f"function {trigger.function!r} already has a trigger named "
                                                      f"{trigger.name!r} in its own manifest")])
            if function is not None and function.output and overlaps(trigger.subject, function.output):
                raise ManifestError(source, [("subject", f"function {trigger.function!r} outputs to "
                                                         f"{function.output}, which this trigger matches: every "
                                                         f"result would run it again, without end")])

    def check_schedules(self, known_functions: set[str]) -> None:
        seen: dict[str, str] = {}
        for schedule in self.all_schedules():
            if schedule.name in seen:
                raise ManifestError(schedule.source, [("name", f"schedule {schedule.name!r} is already "
                                                               f"declared in {seen[schedule.name]}")])
            seen[schedule.name] = schedule.source
        for sched in self.schedules.values():
            if sched.function not in self.functions and sched.function not in known_functions:
                raise ManifestError(self.sources[f"Schedule:{sched.name}"],
                                    [("function", f"unknown function {sched.function!r}")])

    def all_schedules(self) -> list[Schedule]:
        out = [Schedule.from_spec(spec, fn.name, self.sources[f"Function:{fn.name}"])
               for fn in self.functions.values() for spec in fn.schedules]
        out += [Schedule.from_spec(s, s.function, self.sources[f"Schedule:{s.name}"])
                for s in self.schedules.values()]
        return out

