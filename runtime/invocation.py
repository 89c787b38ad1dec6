"""One delivered invocation message and what its JetStream ack subject says about it."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.msg import Msg

from . import headers as H
from .protocol import fallback_call_id, parse_ack
from .wire import call_id_for


@dataclass(slots=True)
class Invocation:
    msg: Msg
    function: str
    stream: str
    stream_seq: int
    delivered: int
    headers: dict[str, str]
    call_id: str
    timed_out: bool = False

    @classmethod
    def from_msg(cls, msg: Msg, function: str) -> Invocation:
        ack = parse_ack(msg.reply)
        hdrs = msg.headers or {}
        # Headers are untrusted: an id too long or odd to use becomes a digest (see wire.call_id_for).
        call_id = (call_id_for(hdrs.get(H.CALL_ID) or hdrs.get(H.MSG_ID))
                   or fallback_call_id(ack.stream, ack.stream_seq))
        return cls(msg=msg, function=function, stream=ack.stream, stream_seq=ack.stream_seq,
                   delivered=ack.delivered, headers=hdrs, call_id=call_id)

    @property
    def reply_to(self) -> str | None:
        return self.headers.get(H.REPLY_TO) or None

    @property
    def content_type(self) -> str | None:
        return self.headers.get(H.CONTENT_TYPE)
