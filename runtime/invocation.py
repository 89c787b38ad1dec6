"""One delivered invocation message and what its JetStream ack subject says about it."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.msg import Msg

from . import headers as H
from .protocol import fallback_call_id, parse_ack
from .results import watches_outcome
from .streams import INVOKE_STREAM
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
    trigger: str | None = None   # the trigger that ran it, for an event (or a replayed one)

    @classmethod
    def from_msg(cls, msg: Msg, function: str) -> Invocation:
        ack = parse_ack(msg.reply)
        hdrs = msg.headers
        if hdrs:
            # Headers are untrusted: an id too long or odd to use becomes a digest (see wire.call_id_for).
            call_id = (call_id_for(hdrs.get(H.CALL_ID) or hdrs.get(H.MSG_ID))
                       or fallback_call_id(ack.stream, ack.stream_seq))
            trigger = hdrs.get(H.TRIGGER) or None
        else:   # a plain publish: its id is made of where it is stored
            hdrs, call_id, trigger = {}, fallback_call_id(ack.stream, ack.stream_seq), None
        return cls(msg=msg, function=function, stream=ack.stream, stream_seq=ack.stream_seq,
                   delivered=ack.delivered, headers=hdrs, call_id=call_id, trigger=trigger)

    @classmethod
    def from_event(cls, msg: Msg, function: str, trigger: str) -> Invocation:
        """An event delivered by a trigger's consumer.

        Its call id is its own, made of the function, the trigger and the event's place in its
        stream: every function an event fans out to is a call of its own (an id the event carries,
        such as the ``Fn-Call-Id`` of the call whose output it is, names what caused it instead).
        """
        ack = parse_ack(msg.reply)
        call_id = event_call_id(function, trigger, ack.stream_seq)
        return cls(msg=msg, function=function, stream=ack.stream, stream_seq=ack.stream_seq,
                   delivered=ack.delivered, headers=msg.headers or {}, call_id=call_id, trigger=trigger)

    @property
    def event(self) -> bool:
        """Delivered by a trigger's consumer (a replayed event comes back as an ``fn.invoke`` call)."""
        return self.trigger is not None and self.stream != INVOKE_STREAM

    @property
    def subject(self) -> str:
        """The subject the function was called on: for an event (even replayed), the event's."""
        return self.headers.get(H.EVENT_SUBJECT) or self.msg.subject if self.trigger else self.msg.subject

    @property
    def error_key(self) -> str:
        """Where an attempt's error is kept (see ``deadletter.record_error``) for its dead letter."""
        return error_key(self.stream, self.stream_seq, self.function)

    @property
    def reply_to(self) -> str | None:
        return self.headers.get(H.REPLY_TO) or None

    @property
    def watches_outcome(self) -> bool:
        """Its caller reads the stored outcome as it is written (see ``headers.WATCHES_OUTCOME``)."""
        return watches_outcome(self.headers)

    @property
    def content_type(self) -> str | None:
        return self.headers.get(H.CONTENT_TYPE)


def error_key(stream: str, seq: int, function: str) -> str:
    """The key of an attempt's error: the sequence for ``FN``; for other streams, whose events
    several functions consume, the stream, the sequence and the function."""
    return str(seq) if stream == INVOKE_STREAM else f"{stream}.{seq}.{function}"


def event_call_id(function: str, trigger: str, seq: int) -> str:
    """The call id of the run of ``function`` for the event at ``seq`` of its trigger's stream."""
    return call_id_for(f"ev-{function}-{trigger}-{seq}") or ""
