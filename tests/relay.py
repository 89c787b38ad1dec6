"""A loopback TCP relay in front of a server: a test cuts the connections through it, and can turn
new ones away for a while, to see what a client does when its link to the server breaks while the
server and everything else connected to it go on."""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    """``async with Relay(port) as relay``: ``relay.url`` reaches the server on ``port``."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.host = host
        self.port = 0
        self.accepting = True
        self.connections = 0   # accepted so far
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self, *, refuse: bool = False) -> None:
        """Close every connection through the relay; ``refuse``: turn new ones away until ``accept()``."""
        self.accepting = not refuse
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def accept(self) -> None:
        self.accepting = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, upstream_writer))
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        # One side ended: so does the other (what a broken link looks like to both ends).
        sink.transport.abort()
        self._writers.discard(sink)
