"""Run Python functions from NATS JetStream: manifests, retries, dead letters, cron, request-reply."""

from __future__ import annotations

from .context import Context
from .errors import (
    FnRuntimeError,
    FunctionError,
    InvalidInput,
    InvocationError,
    InvocationTimeout,
    LoadError,
    ManifestError,
    Reject,
    Rejected,
    Retry,
    Unavailable,
    UnknownFunction,
)
from .manifest import FunctionManifest
from .settings import Settings

__all__ = [
    # writing functions
    "Context",
    "Reject",
    "Retry",
    # configuration
    "FunctionManifest",
    "Settings",
    # errors
    "FnRuntimeError",
    "FunctionError",
    "InvalidInput",
    "InvocationError",
    "InvocationTimeout",
    "LoadError",
    "ManifestError",
    "Rejected",
    "Unavailable",
    "UnknownFunction",
]
