"""A caller that watches its outcome's subject in ``fn_results`` is answered by the stored outcome.

``Client.invoke`` subscribes to the subjects its own call ids are stored on and marks its calls
``Fn-Watches-Outcome: 1``: the runtime's write of the outcome is then the answer, and no second
message goes to ``Fn-Reply-To``. Where nothing is stored, or the caller may not subscribe there,
the answer comes to the inbox as before.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from runtime import Client, FunctionError, NoResult
from runtime import headers as H
from runtime.results import result_subject

from .conftest import RuntimeFactory, collect, eventually
from .test_client import fn


def answers_for(received: list[Any], call_id: str) -> list[Any]:
    """The messages among ``received`` that answer ``call_id`` (the PubAcks on an inbox carry no call id)."""
    return [m for m in received if (m.headers or {}).get(H.CALL_ID) == call_id]


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
