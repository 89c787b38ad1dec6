"""Finding the messages of ``FN`` that ran out of deliveries with no advisory to say so.

The dead-letter mover learns of a failed message from its ``MAX_DELIVERIES`` advisory, but an
advisory the server could not store (the store was full) is lost, and its message would stay
in ``FN`` for good, delivered no more. A sweep finds such messages from what each function's
consumer reports, and hands each one to the mover.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg
from nats.js.errors import NotFoundError

from .streams import INVOKE_STREAM, filter_subjects, invoke_consumers

SWEEP_LIMIT = 256    # messages a sweep handles; one that reaches it is followed by another at once

# Moves one exhausted message, given the consumer it ran out of deliveries on.
MoveExhausted = Callable[[ConsumerInfo, RawStreamMsg], Awaitable[object]]


def exhausted_up_to(info: ConsumerInfo) -> int:
    """The ``FN`` sequence up to which a message of this consumer still in ``FN`` has no delivery left.

    ``FN`` keeps a message until it is acknowledged or terminated, so one the consumer has
    delivered and that is still there is either pending (being worked on, or waiting for its
    redelivery) or out of deliveries. Nothing below the ack floor is pending, and nothing
    delivered is when nothing is pending at all. The server leaves the ack floor below a
    message that ran out of deliveries until an acknowledgement finds nothing pending, so the
    floor alone misses the message after which nothing else was sent.
    """
    config = info.config
    if not config.durable_name or not filter_subjects(config) or (config.max_deliver or -1) < 1:
        return 0
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    if info.num_ack_pending:
        return floor
    return max(floor, info.delivered.stream_seq if info.delivered else 0)


async def sweep_exhausted(js: JetStreamContext, move: MoveExhausted, *, limit: int = SWEEP_LIMIT,
                          running: Callable[[], bool] = lambda: True) -> int:
    """Hand every message of ``FN`` that ran out of deliveries to ``move``, oldest first per function.

    Returns how many it handled, at most ``limit``; stops early once ``running`` says so.
    """
    handled = 0
    # What FN holds of a function is undelivered, pending, or out of deliveries; a function
    # with nothing of the last kind costs no more than this one request.
    state = (await js.stream_info(INVOKE_STREAM, subjects_filter=">")).state
    held = state.subjects or {}
    for info in await invoke_consumers(js):
        subjects, bound = filter_subjects(info.config), exhausted_up_to(info)
        accounted = (info.num_pending or 0) + (info.num_ack_pending or 0)
        exact = all(not {"*", ">"} & set(subject.split(".")) for subject in subjects)
        if exact and sum(held.get(subject, 0) for subject in subjects) <= accounted:
            continue
        for subject in subjects:
            seq = 1
            while seq <= bound and handled < limit and running():
                try:
                    original = await js.get_msg(INVOKE_STREAM, seq, subject=subject, next=True)
                except NotFoundError:
                    break
                if original.seq is None or original.seq > bound:
                    break
                await move(info, original)
                handled += 1
                seq = original.seq + 1
    return handled
