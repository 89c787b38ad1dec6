"""A caller that watches its outcome's subject in ``fn_results`` is answered by the stored outcome.

``Client.invoke`` subscribes to the subjects its own call ids are stored on and marks its calls
``Fn-Watches-Outcome: 1``: the runtime's write of the outcome is then the answer, and no second
message goes to ``Fn-Reply-To``. Where nothing is stored, or the caller may not subscribe there,
the answer comes to the inbox as before.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from runtime import Client, FunctionError, NoResult
from runtime import headers as H
from runtime.results import result_subject

from .conftest import RuntimeFactory, RuntimeProcess, collect, eventually
from .relay import Relay
from .test_client import fn


def answers_for(received: list[Any], call_id: str) -> list[Any]:
    """The messages among ``received`` that answer ``call_id``: PubAcks on an inbox carry no call id,
    and what JetStream reads back from the store (a runtime's direct gets) carries its sequence."""
    return [m for m in received if (m.headers or {}).get(H.CALL_ID) == call_id and "Nats-Sequence" not in m.headers]


async def test_a_stored_outcome_is_the_answer_itself(runtime: RuntimeFactory, nats_server: Any, nc: NATS) -> None:
    await runtime(greet=fn("greet", "core:greet"), fails=fn("fails", "core:always_fail", retry={"max_deliver": 1}))
    on_inboxes, _ = await collect(nc, "_INBOX.>")
    stored, _ = await collect(nc, "$KV.fn_results.>")
    async with Client(nats_server.url) as client:
        response = await client.invoke_response("greet", {"name": "Ada"})
        assert response.value() == {"greeting": "Hello, Ada!"}
        # What the caller sees is the answer's contract, not the write's conditions.
        assert set(response.headers) == {H.CALL_ID, H.CONTENT_TYPE}
        assert response.headers[H.CALL_ID] == response.call_id
        with pytest.raises(FunctionError) as failed:
            await client.invoke("fails", {"n": 1}, timeout=10)
        assert failed.value.call_id
        for call_id in (response.call_id, failed.value.call_id):
            await eventually(lambda c=call_id: answers_for(stored, c), message=f"the outcome of {call_id} stored")
            assert [m.subject for m in answers_for(stored, call_id)] == [result_subject(call_id)]
        await nc.flush()
        # One message each: the write of the outcome. Nothing was sent to the caller's inbox.
        assert answers_for(on_inboxes, response.call_id) == []
        assert answers_for(on_inboxes, failed.value.call_id) == []
        assert await client.result(response.call_id) == {"greeting": "Hello, Ada!"}


async def test_without_a_stored_outcome_the_caller_is_answered_on_its_inbox(runtime: RuntimeFactory,
                                                                           nats_server: Any, nc: NATS) -> None:
    await runtime(greet=fn("greet", "core:greet", store_results="never"))
    on_inboxes, _ = await collect(nc, "_INBOX.>")
    stored, _ = await collect(nc, "$KV.fn_results.>")
    async with Client(nats_server.url) as client:
        response = await client.invoke_response("greet", {"name": "Bo"})
        assert response.value() == {"greeting": "Hello, Bo!"}
        with pytest.raises(NoResult):
            await client.result(response.call_id)
    await nc.flush()
    assert len(answers_for(on_inboxes, response.call_id)) == 1
    assert stored == []


async def test_any_client_may_watch_the_outcome_instead_of_its_inbox(runtime: RuntimeFactory, nc: NATS) -> None:
    """The wire contract, as a client in another language uses it."""
    await runtime(greet=fn("greet", "core:greet"))
    inbox = nc.new_inbox()
    on_inbox, _ = await collect(nc, inbox)
    outcome, _ = await collect(nc, result_subject("order-42"))
    headers = {H.CALL_ID: "order-42", H.MSG_ID: "order-42", H.REPLY_TO: inbox}
    await nc.jetstream().publish("fn.invoke.greet", json.dumps({"name": "Cy"}).encode(),
                                 headers={**headers, H.WATCHES_OUTCOME: "1"})
    await eventually(lambda: outcome, message="the stored outcome")
    assert json.loads(outcome[0].data) == {"greeting": "Hello, Cy!"}
    assert outcome[0].headers[H.CALL_ID] == "order-42"
    # A call that says nothing of it (or anything but "1") is answered on its inbox too.
    for call_id, watches in (("order-43", None), ("order-44", "yes")):
        extra = {} if watches is None else {H.WATCHES_OUTCOME: watches}
        await nc.jetstream().publish("fn.invoke.greet", json.dumps({"name": "Cy"}).encode(),
                                     headers={**headers, H.CALL_ID: call_id, H.MSG_ID: call_id, **extra})
        await eventually(lambda c=call_id: answers_for(on_inbox, c), message=f"the answer to {call_id}")
    await nc.flush()
    assert answers_for(on_inbox, "order-42") == []


async def test_a_waiting_caller_hears_of_a_lost_worker_from_the_stored_outcome(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path], nats_server: Any,
        nc: NATS) -> None:
    """The dead-letter mover of another runtime stores the failure, and that write answers the
    caller, within seconds although the killed runtime left a request for advisories behind."""
    manifests = manifest_dir(hang="name: hang\nhandler: tests.handlers.deadletters:hang\ntimeout: 60s\n"
                                  "ack_wait: 1s\nretry: {max_deliver: 1}\n")
    started, _ = await collect(nc, "test.events.hang")
    on_inboxes, _ = await collect(nc, "_INBOX.>")
    first = runtime_process(manifests)
    await first.wait_ready()
    async with Client(nats_server.url) as client:
        call = asyncio.ensure_future(client.invoke("hang", {"job": 1}, timeout=60))
        await eventually(lambda: started, message="the attempt running")
        first.signal(signal.SIGKILL)
        await first.wait_exit(10)
        killed = time.monotonic()
        await runtime_process(manifests).wait_ready()
        with pytest.raises(FunctionError) as lost:
            await asyncio.wait_for(call, 60)
        # The advisory may go to the dead runtime's request: then 2 s for it to end, 5 s of ack
        # wait, a second for the ack wait of the attempt; the rest is slack for a busy machine.
        assert time.monotonic() - killed < 20
    assert lost.value.message.startswith("worker lost")
    await nc.flush()
    assert answers_for(on_inboxes, lost.value.call_id) == []


@pytest.mark.parametrize("how", ["invoke", "own call id", "stream"])
async def test_a_caller_whose_link_broke_while_its_call_ran_is_answered_once_back(
        runtime: RuntimeFactory, nats_server: Any, nc: NATS, how: str) -> None:
    """The outcome was stored while the caller's connection was down, so neither its write nor a
    reply reached the caller: back on the server, the caller reads it, long before its timeout."""
    await runtime(sleepy=fn("sleepy", "core:sleepy"))
    events, _ = await collect(nc, "test.events.sleepy")
    async with Relay(nats_server.port) as relay, Client(relay.url) as client:
        assert await client.invoke("sleepy", {"seconds": 0}, timeout=5) == {"slept": 0}

        async def call() -> Any:
            payload = {"seconds": 0.3}
            if how == "stream":
                return [event async for event in client.stream("sleepy", payload, timeout=30)][-1].value
            return await client.invoke("sleepy", payload, timeout=30,
                                       call_id="link-1" if how == "own call id" else None)

        began = time.monotonic()
        waiting = asyncio.ensure_future(call())
        await eventually(lambda: [e for e in events if json.loads(e.data)["phase"] == "start"][1:],
                         message="the call running")
        relay.cut(refuse=True)
        await eventually(lambda: [e for e in events if json.loads(e.data)["phase"] == "end"][1:],
                         message="the call ending while the caller is away")
        await asyncio.sleep(0.3)   # the outcome is stored, and nobody hears of it
        assert not waiting.done()
        relay.accept()
        assert await asyncio.wait_for(waiting, 15) == {"slept": 0.3}
        assert time.monotonic() - began < 15
        assert relay.connections == 2, "the caller reconnected once"
