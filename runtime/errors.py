"""One error tree for the whole package, the control-flow exceptions handlers raise, and how errors are put
into words: :func:`describe` for any error, :func:`validation_problems` for what pydantic found."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError

from .wire import clip

MAX_ERROR = 4096    # characters of an error message kept in outcomes, dead letters and error lines
MAX_PROBLEMS = 20   # validation problems listed in one message; the count says how many more there were
_LONG_FIELD = 60    # characters of one field name shown (an unknown key may be arbitrarily long)


class FnRuntimeError(Exception):
    """Base class of every error this package raises."""


class ConfigError(FnRuntimeError):
    """Raised when settings or command-line options are invalid."""


class ManifestError(FnRuntimeError):
    """Raised when a manifest file cannot be read or fails validation."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {format_problems(problems)}")


class LoadError(FnRuntimeError):
    """Raised when a handler cannot be imported or does not fit the function contract."""


class ServerError(FnRuntimeError):
    """Raised when the embedded nats-server cannot be started or reached."""


# ---------------------------------------------------------------- invocation errors


class InvocationError(FnRuntimeError):
    """Raised to a caller when an invocation ended in failure.

    Carries the wire error: a ``type``, a human ``message`` (never prefixed with the type) and the
    NATS micro error ``code``. The ``type`` is the error class's name for the runtime's own errors
    (``InvalidInput``, ``Rejected``, ``UnknownFunction``, ``PayloadTooLarge``, ``Unavailable``,
    ``InvocationTimeout``, ``Expired``, ``QueueFull``, ``Cancelled``, ``ResultTooLarge``) and the
    exception's class name for an error the function raised (``ValueError``).
    """

    code: ClassVar[int] = 500
    kind: ClassVar[str] = "InvocationError"

    def __init__(self, message: str, *, type: str | None = None, call_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.kind
        self.call_id = call_id

    @property
    def described(self) -> str:
        """``type: message`` on one line (see :func:`describe`)."""
        return describe(self)

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, "code": self.code}}


class InvalidInput(InvocationError):
    """Raised when the input cannot be decoded or does not validate."""

    code = 400
    kind = "InvalidInput"


class Rejected(InvocationError):
    """Raised to a caller when the function rejected its input with ``Reject``."""

    code = 422
    kind = "Rejected"


class UnknownFunction(InvocationError):
    """Raised when no function of that name is deployed."""

    code = 404
    kind = "UnknownFunction"


class FunctionError(InvocationError):
    """Raised when the function raised on its last attempt."""

    code = 500
    kind = "FunctionError"


class ResultTooLarge(FunctionError):
    """Raised when a function's result does not fit in one message of the server."""

    kind = "ResultTooLarge"


class PayloadTooLarge(InvocationError):
    """Raised when an input does not fit in one message once the runtime's headers are added."""

    code = 413
    kind = "PayloadTooLarge"


class Unavailable(InvocationError):
    """Raised when the invocation could not be stored."""

    code = 503
    kind = "Unavailable"


class InvocationTimeout(InvocationError):
    """Raised when an attempt exceeded its timeout, or a caller stopped waiting."""

    code = 504
    kind = "InvocationTimeout"


class Expired(InvocationTimeout):
    """Raised to a caller when the invocation waited in the queue past its TTL and was never run."""

    kind = "Expired"


class QueueFull(InvocationError):
    """Raised when the function's queue holds ``max_queued`` invocations already: this one was not stored."""

    code = 429
    kind = "QueueFull"


class Cancelled(InvocationError):
    """Raised to a caller when the delayed call was cancelled before it ran."""

    code = 409
    kind = "Cancelled"


class PermissionDenied(InvocationError):
    """Raised when the server refused a publish or subscription for lack of permission.

    ``action`` is ``publish`` or ``subscribe``; ``subject`` is what the server named. Nothing was
    stored or sent.
    """

    code = 403
    kind = "PermissionDenied"

    def __init__(self, message: str, *, subject: str = "", action: str = "",
                 call_id: str | None = None) -> None:
        super().__init__(message, call_id=call_id)
        self.subject = subject
        self.action = action


class AuthError(FnRuntimeError):
    """Raised when the NATS server refuses our credentials or certificate (retrying cannot help)."""


class NotPending(FnRuntimeError):
    """Raised when cancelling a call that is not a delayed call still waiting (unknown, or fired already)."""


class ConnectionLost(FnRuntimeError):
    """Raised when the runtime's NATS connection was closed for good and will not come back."""


class NoResult(FnRuntimeError):
    """Raised when no outcome is stored for a call id (yet).

    ``replayed_at`` (RFC 3339 UTC) and ``replayed_from`` (a dead letter's sequence) are set when
    the call is pending because ``runtime dlq replay`` cleared its outcome; None otherwise.
    """

    def __init__(self, message: str, *, replayed_at: str | None = None, replayed_from: int | None = None) -> None:
        super().__init__(message)
        self.replayed_at = replayed_at
        self.replayed_from = replayed_from


ERRORS_BY_CODE: dict[int, type[InvocationError]] = {
    cls.code: cls for cls in (InvalidInput, Rejected, UnknownFunction, FunctionError, Unavailable,
                              InvocationTimeout, PayloadTooLarge, QueueFull, Cancelled)
}
# Errors that share a code with a broader one are told apart by their type.
ERRORS_BY_TYPE: dict[str, type[InvocationError]] = {Expired.kind: Expired}


def error_from_wire(code: int, type_: str | None, message: str, call_id: str | None = None) -> InvocationError:
    """Build the typed error matching a wire error code (and type, where a code has several)."""
    cls = ERRORS_BY_TYPE.get(type_ or "")
    if cls is None or cls.code != code:
        cls = ERRORS_BY_CODE.get(code, InvocationError)
    return cls(message, type=type_, call_id=call_id)


# ------------------------------------------------------------ control flow in handlers


class Retry(FnRuntimeError):
    """Raised by a handler to run the invocation again after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = max(0.0, float(delay))
        self.reason = reason


class Reject(FnRuntimeError):
    """Raised by a handler to stop the invocation for good: no retries, dead-lettered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------ describing errors in one line


def describe(exc: BaseException, limit: int = MAX_ERROR) -> str:
    """``type: message`` of an error, on one line and at most about ``limit`` characters.

    The type is the class name, or an :class:`InvocationError`'s own ``type``. A message that
    already starts with the type (``ValueError: boom`` kept from an earlier attempt) or names it
    the way nats-py does (``nats: APIError: ...``) is not prefixed again; an error without a
    message is its type alone. Error text travels in headers and log lines, hence one line.
    """
    if isinstance(exc, InvocationError):
        kind, text = exc.type, exc.message
    else:
        kind, text = type(exc).__name__, str(exc)
    text = clip(text, limit)
    if not text:
        return kind
    return text if text.startswith(kind) or f"{kind}:" in text else f"{kind}: {text}"


def validation_problems(exc: ValidationError, root: str = "") -> list[tuple[str, str]]:
    """``(field, problem)`` for what pydantic found, the way manifests, settings and inputs report it.

    Fields read ``retry.backoff[1]``; ``root`` names a problem of the whole document (such as
    input that is not JSON). Beyond :data:`MAX_PROBLEMS` a first line says how many there were.
    """
    found = exc.errors()
    problems = []
    if len(found) > MAX_PROBLEMS:
        problems.append(("", f"{len(found)} problems, the first {MAX_PROBLEMS} follow"))
    for err in found[:MAX_PROBLEMS]:
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        problems.append((_field(err["loc"]) or root, message))
    return problems


def format_problems(problems: list[tuple[str, str]]) -> str:
    """``field: problem; field: problem``; a problem of no particular field is its message alone."""
    return "; ".join(f"{field}: {message}" if field else message for field, message in problems)


def validation_message(exc: BaseException, root: str = "input") -> str:
    """One bounded line saying why a value did not validate; any other error is described."""
    if isinstance(exc, ValidationError):
        return clip(format_problems(validation_problems(exc, root)), MAX_ERROR)
    return describe(exc)


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part) if len(str(part)) <= _LONG_FIELD else str(part)[:_LONG_FIELD] + "..."
            out += f".{text}" if out else text
    return out
