"""Run Python functions from NATS JetStream: manifests, retries, dead letters, cron, request-reply."""

from __future__ import annotations

from .client import Call, Client
from .context import Context
from .errors import (
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
    # writing functions
    "Context",
    "Reject",
    "Retry",
    # configuration
    "FunctionManifest",
    "Settings",
    # errors
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
    "QueueFull",
    "Rejected",
    "ResultTooLarge",
    "Unavailable",
    "UnknownFunction",
]
