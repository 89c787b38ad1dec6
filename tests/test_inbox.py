"""One wildcard inbox for many requests: replies matched by token, deadlines settled by one watchdog."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime.inbox import OnReply, ReplyInbox


async def test_replies_reach_their_own_waiter_and_late_ones_get_none(nc: NATS) -> None:
    inbox = ReplyInbox(nc, tick=0.01)
    await inbox.start()
    loop = asyncio.get_running_loop()
    first, first_reply = inbox.expect(loop.time() + 5)
    second, second_reply = inbox.expect(loop.time() + 5)
    late, late_reply = inbox.expect(loop.time() + 0.05)
    assert len({first, second, late}) == 3
    await nc.publish(second, b"two")
    await nc.publish(first, b"one")
    got = await asyncio.wait_for(asyncio.gather(first_reply, second_reply, late_reply), 2)
    assert [None if m is None else m.data for m in got] == [b"one", b"two", None]
    await inbox.stop()


async def test_callbacks_get_the_reply_or_none_and_forgotten_subjects_nothing(nc: NATS) -> None:
    inbox = ReplyInbox(nc, tick=0.01)
    await inbox.start()
    loop = asyncio.get_running_loop()
    seen: dict[str, bytes | None] = {}
    both = asyncio.Event()

    def record(key: str) -> OnReply:
        async def on_reply(msg: Msg | None) -> None:
            seen[key] = None if msg is None else msg.data
            if len(seen) == 2:
                both.set()
        return on_reply

    answered = inbox.on_reply(loop.time() + 5, record("answered"))
    inbox.on_reply(loop.time() + 0.05, record("expired"))
    forgotten, waiter = inbox.expect(loop.time() + 0.05)
    inbox.forget(forgotten)
    await nc.publish(answered, b"ack")
    await nc.publish(forgotten, b"ignored")
    await asyncio.wait_for(both.wait(), 2)
    assert seen == {"answered": b"ack", "expired": None}
    assert not waiter.done()
    await inbox.stop()
    assert not inbox.started


async def test_a_second_prefix_answers_only_the_requests_made_for_it(nc: NATS) -> None:
    inbox = ReplyInbox(nc, tick=0.01)
    await inbox.start()
    await inbox.also_on("outcomes.c1")
    loop = asyncio.get_running_loop()
    watched, watched_reply = inbox.expect(loop.time() + 5, also=True)
    plain, plain_reply = inbox.expect(loop.time() + 0.3)
    gone, gone_reply = inbox.expect(loop.time() + 5, also=True)
    marker, marker_reply = inbox.expect(loop.time() + 0.3, also=True)
    await nc.publish(f"outcomes.c1.{inbox.token(plain)}", b"not for a plain request")
    await nc.publish(f"outcomes.c1.{inbox.token(marker)}", b"", headers={"KV-Operation": "DEL"})
    inbox.forget(gone)
    await nc.publish(f"outcomes.c1.{inbox.token(gone)}", b"forgotten")
    await nc.publish(f"outcomes.c1.{inbox.token(watched)}", b"stored")
    await nc.publish(watched, b"the inbox, later")   # whichever comes first
    got = await asyncio.wait_for(asyncio.gather(watched_reply, plain_reply, marker_reply), 2)
    assert [None if m is None else m.data for m in got] == [b"stored", None, None]
    assert not gone_reply.done()
    await inbox.stop()
