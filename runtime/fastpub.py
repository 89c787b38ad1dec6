"""Acks and the runtime's own messages with less work per message than ``Client.publish``.

Every invocation ends in a publish: its ack, and often its stored outcome. ``Client.publish``
checks the subject, encodes a header dict and goes through four coroutines and a queue for
each of them, which is a large share of what a no-op invocation costs. A ``Publisher`` writes
the protocol line straight into the client's outgoing buffer and wakes its flusher once per
batch, as ``Client.publish`` would.

A caller's answer can go out at once (``at_once``): written to the socket in the same step,
ahead of the store and ack work that follows it, unless a flush is already due, in which case
it joins that one. Either way the flusher is then due, so whatever follows in the same loop
pass is written together: at most one extra write per pass, not one per answer.

``pings_in_order`` writes what is buffered ahead of a flush's PING, so that ``flush()`` waits
for the server to have it (nats-py writes the PING ahead of it).

Only for subjects and headers the runtime made or checked itself: ack subjects come from the
server, header values from :mod:`runtime.wire`'s checks. It leans on nats-py's client internals,
checked once; with a client that lacks them, or while the connection is not up (reconnecting,
draining, closed), every message goes through ``Client.publish``, which buffers or raises as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS

from .loop import spawn

log = logging.getLogger("runtime.fastpub")

_INTERNALS = ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue", "_flusher_task", "stats",
              "_status", "_transport")
_CRLF = b"\r\n"
_HEADER_LINE = b"NATS/1.0\r\n"


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The header block of a message. ValueError for a key or value that would break the protocol."""
    text = "".join([f"{key}: {value}\r\n" for key, value in headers.items()])
    keys = "".join(headers)   # a colon or space in any key shows here; an empty key is looked up
    if text.count("\r") != len(headers) or text.count("\n") != len(headers) or ":" in keys or " " in keys or (
            "" in headers):
        raise ValueError(f"headers that cannot be sent as they are: {sorted(headers)}")
    return _HEADER_LINE + text.encode() + _CRLF


_LATER: set[asyncio.Task[None]] = set()   # publishes handed to Client.publish, kept until done


class Publisher:
    """Publishes on ``nc`` by appending to its outgoing buffer (see the module's docstring)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.direct = all(hasattr(nc, name) for name in _INTERNALS)
        self._connected = getattr(NATS, "CONNECTED", None)

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: Mapping[str, str] | None = None, *, at_once: bool = False) -> None:
        """Publish like ``Client.publish``; raises what it raises when the connection is not up.

        ``at_once``: written to the socket now (with whatever is pending before it), unless the
        flusher is already due to write, then with it.
        """
        if not self._write(subject, payload, reply, headers, at_once):
            await self.nc.publish(subject, payload, reply=reply, headers=dict(headers) if headers else None)

    def try_publish(self, subject: str, payload: bytes = b"") -> bool:
        """Append a message without headers to the outgoing buffer, at once; False if it cannot be
        (the connection is not up, the buffer is full): :meth:`publish` then must."""
        return self._write(subject, payload, "", None)

    def publish_nowait(self, subject: str, payload: bytes = b"", reply: str = "",
                       headers: Mapping[str, str] | None = None) -> None:
        """Publish without waiting: appended to the buffer, or published by :meth:`publish` in a task
        (the connection is not up); what that raises is logged, the message is then lost."""
        if not self._write(subject, payload, reply, headers):
            spawn(_LATER, self._publish_later(subject, payload, reply, headers))

    async def _publish_later(self, subject: str, payload: bytes, reply: str,
                             headers: Mapping[str, str] | None) -> None:
        try:
            await self.publish(subject, payload, reply, headers)
        except Exception as exc:
            log.warning("could not publish to %s: %s", subject[:80], exc or type(exc).__name__)

    def _write(self, subject: str, payload: bytes, reply: str, headers: Mapping[str, str] | None,
               at_once: bool = False) -> bool:
        """Append the message to the outgoing buffer; False if it cannot be (``Client.publish`` must)."""
        nc: Any = self.nc
        if not self.direct or nc._status != self._connected or len(payload) > nc.max_payload:
            return False
        flusher = nc._flusher_task
        if flusher is None or flusher.done() or nc._flush_queue is None:
            return False
        if headers:
            try:
                block = encode_headers(headers)
            except ValueError:
                return False   # Client.publish cleans them up (or refuses them)
            line = b"HPUB %s %s %d %d\r\n" % (subject.encode(), reply.encode(), len(block),
                                              len(block) + len(payload))
            command = line + block + payload + _CRLF
        else:
            command = f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + _CRLF
        if nc._max_pending_size > 0 and nc._pending_data_size + len(command) > nc._max_pending_size:
            return False   # Client.publish flushes first, waiting for room
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += len(payload)
        queue: asyncio.Queue[asyncio.Future[Any]] = nc._flush_queue
        if queue.empty():   # the flusher is not due to write what is pending
            if at_once and nc._transport is not None:
                # What the flusher does, minus waiting for the socket: a later flush waits for it.
                nc._transport.writelines(nc._pending)
                nc._pending = []
                nc._pending_data_size = 0
            # Wake it once: what is published after this in the same loop pass, answers too, is
            # written together, so answers cost at most one extra write per pass.
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return True


def pings_in_order(nc: NATS) -> bool:
    """Make ``nc.flush()`` wait for the server to have what was sent before it; False if it cannot.

    nats-py writes a flush's PING straight to the socket, ahead of commands still buffered for
    its flusher, such as the SUB of a subscription just made. The server can then answer PONG
    before it has that subscription, and a message published meanwhile from another connection
    never reaches it (about 1 in 100 times on a loopback). Here what is buffered is written
    first, as the flusher would, and the PING right behind it. The PING itself is never
    buffered: a buffer the connection still holds when it drops is sent again after the
    reconnect, and a PING in it would have its PONG answer a later flush too early.
    """
    original = getattr(nc, "_send_ping", None)
    if original is None or not all(hasattr(nc, name) for name in ("_pending", "_pending_data_size", "_transport")):
        return False

    async def send_ping(future: asyncio.Future[Any] | None = None) -> None:
        transport = nc._transport
        if nc.is_connected and transport is not None and nc._pending:
            transport.writelines(nc._pending)
            nc._pending = []
            nc._pending_data_size = 0
        await original(future)

    nc._send_ping = send_ping  # type: ignore[method-assign]
    return True
