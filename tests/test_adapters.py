"""The nats-py behaviour ``runtime/micro.py`` relies on, pinned against a real server.

If a nats-py upgrade changes what the adapter reaches into, these tests fail, and only these.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from runtime.micro import MicroService, reply_subject

from .conftest import collect, eventually


async def echo(request: Request) -> None:
    await request.respond(b"echo:" + request.data)


async def started(nc: NATS, *endpoints: str) -> MicroService:
    service = MicroService(nc, ServiceConfig(name="pinned", version="1.0.0"), may_answer=lambda _: True)
    await service.start()
    for name in endpoints:
        await service.add_endpoint(EndpointConfig(name=name, subject=f"test.micro.{name}", handler=echo))
    await nc.flush()
    return service


async def test_a_removed_endpoint_takes_no_more_requests_and_is_no_longer_listed(nc: NATS) -> None:
    service = await started(nc, "kept", "gone")
    assert (await nc.request("test.micro.gone", b"1", timeout=2)).data == b"echo:1"
    await service.remove_endpoint("gone")
    await nc.flush()
    with pytest.raises(NoRespondersError):
        await nc.request("test.micro.gone", b"2", timeout=2)
    assert (await nc.request("test.micro.kept", b"3", timeout=2)).data == b"echo:3"
    assert [e.name for e in service.info().endpoints] == ["kept"]
    assert [e.name for e in service.stats().endpoints] == ["kept"]
    await service.remove_endpoint("never-added")   # nothing to do
    await service.stop()   # stops the endpoints left, and only those
    with pytest.raises(NoRespondersError):
        await nc.request("test.micro.kept", b"4", timeout=2)


async def test_removal_waits_for_the_requests_the_endpoint_already_received(nc: NATS) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> None:
        entered.set()
        await release.wait()
        await request.respond(b"done")

    service = MicroService(nc, ServiceConfig(name="pinned", version="1.0.0"), may_answer=lambda _: True)
    await service.start()
    await service.add_endpoint(EndpointConfig(name="slow", subject="test.micro.slow", handler=slow))
    request = asyncio.create_task(nc.request("test.micro.slow", b"", timeout=5))
    await entered.wait()
    removal = asyncio.create_task(service.remove_endpoint("slow"))
    done, _ = await asyncio.wait({removal}, timeout=0.3)
    assert not done, "the removal returned while a received request was still being handled"
    release.set()
    await asyncio.wait_for(removal, 5)
    assert (await request).data == b"done"
    await service.stop()


async def test_reply_subject_is_where_the_requester_waits(nc: NATS) -> None:
    seen: list[str] = []

    async def record(request: Request) -> None:
        seen.append(reply_subject(request))
        if seen[-1]:
            await request.respond(b"ok")

    service = MicroService(nc, ServiceConfig(name="pinned", version="1.0.0"), may_answer=lambda _: True)
    await service.start()
    await service.add_endpoint(EndpointConfig(name="record", subject="test.micro.record", handler=record))
    replies, sub = await collect(nc, "test.replies.mine")
    await nc.publish("test.micro.record", b"", reply="test.replies.mine")
    await nc.publish("test.micro.record", b"")   # a plain publish expects no answer
    await eventually(lambda: len(seen) == 2)
    assert seen == ["test.replies.mine", ""]
    await eventually(lambda: replies)
    assert [m.data for m in replies if isinstance(m, Msg)] == [b"ok"]
    await sub.unsubscribe()
    await service.stop()


def test_nats_py_still_offers_no_public_way() -> None:
    # When one of these fails, nats-py has grown the public API: use it in runtime/micro.py instead.
    assert "remove_endpoint" not in vars(Service), "nats.micro Service can remove endpoints now"
    assert not hasattr(Request, "reply"), "nats.micro Request tells its reply subject now"
