"""A lean HTTP/1.1 load generator: keep-alive connections, one request in flight on each.

What ``wrk`` or ``hey`` do, in this process: the callers of a benchmark share the machine with
the server under test, so a client that costs a hundred microseconds of CPU per request (a full
client library such as aiohttp) takes that time from the server. Here a request is bytes built
once, and the answer is parsed by httptools (llhttp, the C parser Node.js uses).
"""

from __future__ import annotations

import asyncio

import httptools


class HttpStatusError(RuntimeError):
    """The server answered with a status other than 2xx."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``send`` writes a request and waits for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the server closed the connection")
        self._fail(self.lost)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body = b"".join(self.body)
        self.body.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.lost is not None or self.transport is None:
            raise ConnectionResetError("the connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


class LoadClient:
    """``POST``s one body to one URL over a pool of keep-alive connections (one per caller)."""

    def __init__(self, host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []

    @property
    def connections(self) -> int:
        """Connections opened so far (one per caller that ran at the same time as others)."""
        return len(self._all)

    async def post(self) -> bytes:
        """The answer's body; raises ``HttpStatusError`` for a status other than 2xx."""
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            status, body = await conn.send(self.request)
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        self._idle.append(conn)
        if not 200 <= status < 300:
            raise HttpStatusError(f"HTTP {status}: {body[:200]!r}")
        return body

    async def _connect(self) -> _Connection:
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        self._all.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()
