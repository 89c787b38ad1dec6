"""One error tree for the whole package, plus the control-flow exceptions handlers raise."""

from __future__ import annotations

from typing import Any, ClassVar


class FnRuntimeError(Exception):
    """Base class of every error this package raises."""


class ConfigError(FnRuntimeError):
    """Raised when settings or command-line options are invalid."""


class ManifestError(FnRuntimeError):
    """Raised when a manifest file cannot be read or fails validation."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        detail = "; ".join(f"{field}: {msg}" if field else msg for field, msg in problems)
        super().__init__(f"{path}: {detail}")


class LoadError(FnRuntimeError):
    """Raised when a handler cannot be imported or does not fit the function contract."""


class ServerError(FnRuntimeError):
    """Raised when the embedded nats-server cannot be started or reached."""


# ---------------------------------------------------------------- invocation errors


class InvocationError(FnRuntimeError):
    """Raised to a caller when an invocation ended in failure.

    Carries the wire error: a ``type`` (the failing exception's class name or a category),
    a human ``message`` and the NATS micro error ``code``.
    """

    code: ClassVar[int] = 500
    kind: ClassVar[str] = "error"

    def __init__(self, message: str, *, type: str | None = None, call_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.kind
        self.call_id = call_id

    @property
    def described(self) -> str:
        """``type: message``, without repeating a type the message already starts with."""
        return self.message if self.message.startswith(self.type) else f"{self.type}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, "code": self.code}}


class InvalidInput(InvocationError):
    """Raised when the input cannot be decoded or does not validate."""

    code = 400
    kind = "invalid_input"


class Rejected(InvocationError):
    """Raised to a caller when the function rejected its input with ``Reject``."""

    code = 422
    kind = "rejected"


class UnknownFunction(InvocationError):
    """Raised when no function of that name is deployed."""

    code = 404
    kind = "unknown_function"


class FunctionError(InvocationError):
    """Raised when the function raised on its last attempt."""

    code = 500
    kind = "function_error"


class ResultTooLarge(FunctionError):
    """Raised when a function's result does not fit in one message of the server."""

    kind = "ResultTooLarge"


class PayloadTooLarge(InvocationError):
    """Raised when an input does not fit in one message once the runtime's headers are added."""

    code = 413
    kind = "payload_too_large"


class Unavailable(InvocationError):
    """Raised when the invocation could not be stored."""

    code = 503
    kind = "unavailable"


class InvocationTimeout(InvocationError):
    """Raised when an attempt exceeded its timeout, or a caller stopped waiting."""

    code = 504
    kind = "timeout"


class ConnectionLost(FnRuntimeError):
    """Raised when the runtime's NATS connection was closed for good and will not come back."""


class NoResult(FnRuntimeError):
    """Raised when no outcome is stored for a call id (yet)."""


ERRORS_BY_CODE: dict[int, type[InvocationError]] = {
    cls.code: cls for cls in (InvalidInput, Rejected, UnknownFunction, FunctionError, Unavailable,
                              InvocationTimeout, PayloadTooLarge)
}


def error_from_wire(code: int, type_: str | None, message: str, call_id: str | None = None) -> InvocationError:
    """Build the typed error matching a wire error code."""
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
