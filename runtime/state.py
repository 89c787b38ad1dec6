"""What the parts of one runtime share: its connection, the functions it serves, and their counters.

The runtime owns this state and changes it; the registry follower, the gateway and the status
responder get the state (and, where they act on the runtime, an explicit callback), never the
runtime itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from .loader import Handler
from .manifest import FunctionManifest
from .stats import CronStats, FunctionStats

if TYPE_CHECKING:
    from .blocking import LoopMonitor
    from .outbox import Outbox
    from .worker import FunctionWorker


class ServingWatcher(Protocol):
    """Told when the runtime starts or stops serving a function (the gateway keeps its endpoints so)."""

    async def serving(self, manifest: FunctionManifest) -> None: ...
    async def stopped_serving(self, name: str) -> None: ...


@dataclass(eq=False)
class RuntimeState:
    """The shared state of one runtime; empty until it connects."""

    nc: NATS | None = None
    js: JetStreamContext | None = None
    outbox: Outbox | None = None
    monitor: LoopMonitor | None = None   # event-loop blocking by handlers, for the status
    workers: dict[str, FunctionWorker] = field(default_factory=dict)   # the functions served here
    # Every function deployed to this runtime, served, failing or refused: a request for one of them
    # is not for an unknown function.
    deployed: dict[str, FunctionManifest] = field(default_factory=dict)
    failing: dict[str, str] = field(default_factory=dict)   # function name -> why it is not served here
    # Function name -> why its handler was not even imported: its module is outside the trusted prefixes.
    refused: dict[str, str] = field(default_factory=dict)
    # Function name -> its triggers that could not be bound here, each with why.
    trigger_failures: dict[str, dict[str, str]] = field(default_factory=dict)
    trusted: tuple[str, ...] = ()   # the module prefixes handlers are imported from (see trust.py)
    watchers: list[ServingWatcher] = field(default_factory=list)
    # For the probes and metrics (see http.py, metrics.py). Stats outlive a worker: counters never go back.
    stats: dict[str, FunctionStats] = field(default_factory=dict)
    cron: CronStats = field(default_factory=CronStats)
    started: float = field(default_factory=time.time)   # wall clock, for the status' uptime
    provisioned: bool = False   # the base streams exist
    serving: bool = False       # every component started and the workers pull
    draining: bool = False      # shutting down: not ready, in-flight work finishing

    @property
    def connection(self) -> tuple[NATS, JetStreamContext]:
        if self.nc is None or self.js is None:
            raise RuntimeError("the runtime is not started")
        return self.nc, self.js

    def stats_for(self, name: str) -> FunctionStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = FunctionStats()
        return stats

    def served(self) -> list[FunctionManifest]:
        """The manifests of the functions served here now."""
        return [worker.manifest for worker in self.workers.values()]

    def handlers(self) -> dict[str, Handler]:
        """Function name -> the handler served for it (what the loop monitor looks for on the stack)."""
        return {name: worker.executor.handler for name, worker in self.workers.items()}
