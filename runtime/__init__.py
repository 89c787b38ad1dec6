"""Run Python functions from NATS JetStream: manifests, retries, dead letters, cron, request-reply."""

from __future__ import annotations

from .client import Call, Client, Final, Progress
from .connection import ConnectOptions
from .context import Context
from .errors import (
    AuthError,
    Cancelled,
    Expired,
    FnRuntimeError,
    FunctionError,
    InvalidInput,
    InvocationError,
    InvocationTimeout,
    LoadError,
    ManifestError,
    NoResult,
    NotPending,
    PayloadTooLarge,
    PermissionDenied,
    QueueFull,
    Reject,
    Rejected,
    ResultTooLarge,
    Retry,
    Unavailable,
    UnknownFunction,
)
from .manifest import FunctionManifest
from .settings import Settings

__all__ = [
    # calling functions
    "Call",
    "Client",
    "ConnectOptions",
    "Final",
    "Progress",
    # writing functions
    "Context",
    "Reject",
    "Retry",
    # configuration
    "FunctionManifest",
    "Settings",
    # errors
    "AuthError",
    "Cancelled",
    "Expired",
    "FnRuntimeError",
    "FunctionError",
    "InvalidInput",
    "InvocationError",
    "InvocationTimeout",
    "LoadError",
    "ManifestError",
    "NoResult",
    "NotPending",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueFull",
    "Rejected",
    "ResultTooLarge",
    "Unavailable",
    "UnknownFunction",
]
