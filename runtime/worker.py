"""One function served by this runtime: pull feed → worker pool → executor, plus in-progress acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .consumer import PullFeed
from .dispatch import PriorityFeed
from .executor import Executor
from .invocation import Invocation
from .loader import Handler
from .logs import call_fields, fields
from .loop import cancel_and_wait
from .manifest import FunctionManifest
from .outbox import Outbox
from .pool import WorkerPool
from .protocol import IN_PROGRESS, NAK
from .stats import FunctionStats
from .triggers import Binding

log = logging.getLogger("runtime.worker")


class FunctionWorker:
    """Serves one function until stopped; settings can change while it runs."""

    def __init__(self, nc: NATS, js: JetStreamContext, manifest: FunctionManifest, handler: Handler,
                 outbox: Outbox, stats: FunctionStats | None = None) -> None:
        self.nc = nc
        self.name = manifest.name
        self.threads: ThreadPoolExecutor | None = None
        self._thread_count = 0   # the size of ``threads``
        if not handler.is_async:
            self._new_threads(manifest.concurrency)
        self.executor = Executor(nc, js, manifest, handler, self.threads, outbox, stats)
        self.pool: WorkerPool[Invocation] = WorkerPool(self._process, manifest.concurrency, name=manifest.name)
        self.feed = PriorityFeed(nc, manifest, self._sink)
        self.executor.requeued = self._requeued
        self.held: dict[str, Invocation] = {}
        # Triggers: a pull feed per (stream, consumer), and which feed each held event came from.
        self.events: dict[tuple[str, str], tuple[Binding, PullFeed]] = {}
        self._event_feed: dict[str, PullFeed] = {}
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        self.completed = 0

    @property
    def manifest(self) -> FunctionManifest:
        return self.executor.manifest

    @property
    def in_flight(self) -> int:
        return len(self.held)

    async def start(self) -> None:
        self._started = True
        await self.feed.start()
        for _, feed in self.events.values():
            await feed.start()
        self._tasks = [asyncio.create_task(self._keep_alive(), name=f"wpi-{self.name}"),
                       asyncio.create_task(self._enforce_timeouts(), name=f"timeouts-{self.name}")]
        log.info("serving %s (concurrency %d, timeout %gs, max_deliver %d)", self.name,
                 self.manifest.concurrency, self.manifest.timeout, self.manifest.retry.max_deliver)

    def update(self, manifest: FunctionManifest, handler: Handler) -> None:
        """Apply new settings to later invocations; running ones finish with the old ones."""
        self.executor.manifest = manifest
        self.executor.handler = handler
        self.pool.resize(manifest.concurrency)
        self.feed.update(manifest)
        if not handler.is_async and (self.threads is None or self._thread_count != manifest.concurrency):
            old = self.threads
            self.executor.threads = self._new_threads(manifest.concurrency)
            if old is not None:
                old.shutdown(wait=False)   # its running calls finish; later ones go to the new pool

    async def set_triggers(self, bindings: list[Binding]) -> None:
        """Take events from exactly these bindings: new ones start, removed ones stop (their
        consumers stay, keeping the events published meanwhile)."""
        wanted = {(b.stream, b.consumer): b for b in bindings}
        for key in [k for k in self.events if k not in wanted]:
            binding, feed = self.events.pop(key)
            await feed.stop()
            log.info("%s: trigger %s stopped", self.name, binding.trigger)
        for key, binding in wanted.items():
            if key in self.events:
                feed = self.events[key][1]
                self.events[key] = (binding, feed)
                feed.resize(self.manifest.concurrency)
                continue
            feed = self._event_feed_for(binding)
            self.events[key] = (binding, feed)
            if self._started:
                await feed.start()
            log.info("%s: trigger %s takes events on %s from stream %s", self.name, binding.trigger,
                     binding.subject, binding.stream)

    @property
    def bindings(self) -> list[Binding]:
        return [binding for binding, _ in self.events.values()]

    def _event_feed_for(self, binding: Binding) -> PullFeed:
        # The sink holds its own feed: an event still on its way once the trigger is removed is
        # run and released like any other.
        def sink(msg: Msg) -> None:
            self._on_event(binding, feed, msg)
        feed = PullFeed(self.nc, binding.stream, binding.consumer, self.manifest.concurrency, sink)
        return feed

    def _on_event(self, binding: Binding, feed: PullFeed, msg: Msg) -> None:
        try:
            inv = Invocation.from_event(msg, self.name, binding.trigger)
        except (ValueError, IndexError):
            log.error("ignoring a message without a JetStream ack subject on %s", msg.subject,
                      extra=call_fields(self.name))
            feed.release()
            return
        self._event_feed[msg.reply] = feed
        self.held[msg.reply] = inv
        self.pool.submit(inv)

    def _requeued(self, inv: Invocation, delay: float) -> None:
        # An event's feed keeps a pull request open, which the redelivery reaches; an invocation's
        # level is told (see PriorityFeed.requeued).
        if inv.msg.reply not in self._event_feed:
            self.feed.requeued(inv.msg.reply, delay)

    def _release(self, reply: str) -> None:
        feed = self._event_feed.pop(reply, None)
        if feed is not None:
            feed.release()
        else:
            self.feed.release(reply)

    def _new_threads(self, count: int) -> ThreadPoolExecutor:
        # A pool cannot be resized through its public API: a new size is a new pool.
        self.threads = ThreadPoolExecutor(max_workers=count, thread_name_prefix=f"fn-{self.name}")
        self._thread_count = count
        return self.threads

    def _sink(self, msg: Msg) -> None:
        try:
            inv = Invocation.from_msg(msg, self.name)
        except (ValueError, IndexError):
            log.error("ignoring a message without a JetStream ack subject on %s", msg.subject,
                      extra=call_fields(self.name))
            self.feed.release(msg.reply)
            return
        self.held[msg.reply] = inv
        self.pool.submit(inv)

    async def _process(self, inv: Invocation) -> None:
        try:
            await self.executor.run(inv)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The executor settles every outcome itself; reaching here is a bug or a lost
            # connection. The message is redelivered after ack_wait.
            log.exception("invocation %s of %s could not be settled", inv.call_id, self.name, extra=fields(inv))
        finally:
            self.completed += 1
            self.held.pop(inv.msg.reply, None)
            self._release(inv.msg.reply)

    async def _keep_alive(self) -> None:
        # Held messages (queued or running) get in-progress acks well within ack_wait, so
        # JetStream never hands a running invocation to another runtime. (The feed keeps its slots.)
        while True:
            await asyncio.sleep(max(0.05, self.manifest.effective_ack_wait / 3))
            for reply in list(self.held):
                try:
                    await self.nc.publish(reply, IN_PROGRESS)
                except Exception as exc:
                    log.debug("in-progress ack failed: %s", exc)
                    break

    async def _enforce_timeouts(self) -> None:
        # Sleeps until the earliest deadline; idle, it sleeps until an invocation starts.
        wake = self.executor.wake
        while True:
            wait = self.executor.expire()
            wake.clear()
            if wait is None:
                await wake.wait()
            elif wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)

    async def stop(self, grace: float) -> None:
        """Stop fetching, let held invocations finish within ``grace``, then cancel the rest."""
        await self.feed.stop()
        for _, feed in self.events.values():
            await feed.stop()
        if not await self.pool.join(grace):
            log.warning("%s: %d invocation(s) still running after %gs; cancelling them", self.name,
                        self.pool.busy, grace)
            await self.pool.cancel()
            for reply in list(self.held):  # queued, never started: give them back at once
                with contextlib.suppress(Exception):
                    await self.nc.publish(reply, NAK)
                    if reply not in self._event_feed:
                        self.feed.requeued(reply, 0.0)
            self.held.clear()
        for task in self._tasks:
            await cancel_and_wait(task)
        await self.pool.cancel()
        if self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)
