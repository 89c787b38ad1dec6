"""What the gateway needs from nats.micro beyond its public API, in one place.

nats-py's micro service adds endpoints but cannot take one away (functions come and go while a
runtime runs), and its ``Request`` does not tell the reply subject (the gateway hands it to the
function's runtime, which answers the requester directly). Both need private attributes of
nats-py; they are read here only, and ``tests/test_adapters.py`` pins the behaviour relied on, so
that a nats-py upgrade that changes it fails there.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig


class MicroService(Service):
    """A nats.micro ``Service`` whose endpoints can also be removed, answering only safe reply subjects.

    nats.micro answers ``$SRV.PING``/``INFO``/``STATS`` on whatever reply subject a request names,
    with this connection's rights: ``$JS.API.STREAM.PURGE.FN`` as the reply of a PING would purge
    the runtime's stream. ``may_answer`` decides which reply subjects get an answer.
    """

    def __init__(self, nc: NATS, config: ServiceConfig, *, may_answer: Callable[[str], bool]) -> None:
        super().__init__(nc, config)
        self.may_answer = may_answer

    async def _handle_ping_request(self, msg: Msg) -> None:
        if self.may_answer(msg.reply):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        if self.may_answer(msg.reply):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        if self.may_answer(msg.reply):
            await super()._handle_stats_request(msg)

    def record_error(self, name: str, error: str) -> bool:
        """Count an error answered for endpoint ``name`` in its STATS; False if there is no such endpoint.

        nats.micro counts only exceptions its handler raises, but the gateway's handler returns once
        the call is stored: its failures are answered later (by whichever runtime runs it).
        """
        for endpoint in self._endpoints:
            if endpoint._name == name:
                endpoint._num_errors += 1
                endpoint._last_error = error
                return True
        return False

    async def remove_endpoint(self, name: str) -> None:
        """Stop serving endpoint ``name``; requests it already received are still handled."""
        for endpoint in [e for e in self._endpoints if e._name == name]:
            # Out of the list first: INFO and STATS stop listing it, and stop() skips it.
            self._endpoints.remove(endpoint)
            if endpoint._subscription is not None:
                sub, endpoint._subscription = endpoint._subscription, None
                await sub.drain()


def reply_subject(request: Request) -> str:
    """The subject the requester waits on for the answer ("" if it expects none)."""
    return request._msg.reply or ""
