"""Manifests: the YAML files that declare functions and schedules, as frozen pydantic models."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .durations import Duration
from .errors import ManifestError

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
HANDLER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MAX_NAME = 64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    """How often and how late a failing invocation runs again."""

    max_deliver: int = Field(default=3, ge=1, le=10_000)
    backoff: list[Duration] = Field(default_factory=lambda: [1.0, 10.0, 60.0])

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2 is the first retry); the last value repeats."""
        if not self.backoff or attempt < 2:
            return 0.0
        return self.backoff[min(attempt - 2, len(self.backoff) - 1)]


class ScheduleSpec(_Model):
    """A cron trigger; inside a function manifest or standalone (``kind: Schedule``)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
    cron: str
    timezone: str = "UTC"
    payload: Any = None
    catchup: Literal["none", "latest", "all"] = "latest"
    enabled: bool = True

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


class FunctionManifest(_Model):
    """One deployable function."""

    kind: Literal["Function"] = "Function"
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
    handler: str
    description: str = ""
    concurrency: int = Field(default=4, ge=1, le=100_000)
    timeout: Duration = 30.0
    ack_wait: Duration | None = None
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    encoding: Literal["json", "msgpack"] = "json"
    store_results: bool = True
    schedules: list[ScheduleSpec] = Field(default_factory=list)

    @field_validator("handler")
    @classmethod
    def _check_handler(cls, value: str) -> str:
        if not HANDLER_PATTERN.match(value):
            raise ValueError(f"{value!r} is not of the form 'package.module:attribute'")
        return value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
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


Manifest = FunctionManifest | ScheduleManifest


class Schedule(ScheduleSpec):
    """A schedule bound to its target function (from either manifest form)."""

    function: str
    source: str = ""

    @classmethod
    def from_spec(cls, spec: ScheduleSpec, function: str, source: str = "") -> Schedule:
        data = spec.model_dump(exclude={"kind", "function"})
        return cls(function=function, source=source, **data)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append((_location(err["loc"]), msg))
    return problems


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate one manifest document; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise ManifestError(source, [("", "a manifest must be a mapping of fields")])
    kind = data.get("kind", "Function")
    model: type[FunctionManifest] | type[ScheduleManifest]
    if kind == "Function":
        model = FunctionManifest
    elif kind == "Schedule":
        model = ScheduleManifest
    else:
        raise ManifestError(source, [("kind", f"unknown kind {kind!r}; use Function or Schedule")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, _problems(exc)) from None


def load_manifest(path: Path) -> Manifest:
    """Read and validate one YAML manifest file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(str(path), [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(str(path), [("", f"invalid YAML: {exc}")]) from None
    return parse_manifest(data, str(path))


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

    @classmethod
    def load(cls, paths: Iterable[str | Path], known_functions: Iterable[str] = ()) -> ManifestSet:
        functions: dict[str, FunctionManifest] = {}
        schedules: dict[str, ScheduleManifest] = {}
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
            else:
                schedules[manifest.name] = manifest
        result = cls(functions=functions, schedules=schedules, sources=sources)
        result.check_schedules(set(known_functions))
        return result

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

