"""Event triggers on a real nats-server: fan-out, dead letters and their replay, pipelines."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import dlq
from runtime.triggers import TRIGGERS_STREAM
from tests.conftest import eventually
from tests.handlers import events

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def fresh() -> None:
    events.seen.clear()
    events.fixed["value"] = False


def fn(name: str, handler: str, extra: str = "") -> str:
    return f"name: {name}\nhandler: tests.handlers.events:{handler}\nconcurrency: 8\n" \
           f"retry: {{max_deliver: 3, backoff: [0.05]}}\n{extra}"


def count(name: str) -> int:
    return len(events.seen.get(name, []))


async def test_one_event_runs_every_subscribed_function_once(runtime: Any, nc: NATS, js: JetStreamContext) -> None:
    await runtime({"trust": ("tests",)},
                  audit=fn("audit", "audit", "triggers:\n  - subject: orders.>\n"),
                  billing=fn("billing", "billing", "triggers:\n  - subject: orders.created\n    name: created\n"))
    for i in range(20):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    await nc.publish("orders.cancelled", b'{"id": 99}')
    await eventually(lambda: count("audit") == 21 and count("billing") == 20)
    first = events.seen["billing"][0]
    assert first["subject"] == "orders.created" and first["trigger"] == "created"
    assert {s["trigger"] for s in events.seen["audit"]} == {"orders-all"}
    assert len({s["call_id"] for s in events.seen["audit"] + events.seen["billing"]}) == 41
    # Every function settled every event: nothing is left in the event stream.
    await eventually(lambda: _stream_empty(js))


async def _stream_empty(js: JetStreamContext) -> bool:
    return (await js.stream_info(TRIGGERS_STREAM)).state.messages == 0


async def test_a_failing_function_dead_letters_and_replays_alone(runtime: Any, nc: NATS, js: JetStreamContext) -> None:
    await runtime({"trust": ("tests",)},
                  audit=fn("audit", "audit", "triggers:\n  - subject: orders.>\n"),
                  broken=fn("broken", "broken", "triggers:\n  - subject: orders.>\n"))
    for i in range(5):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    letters: list[Any] = []

    async def five_letters() -> bool:
        listing = await dlq.list_dead_letters(nc, js, "broken")
        letters[:] = [await dlq.get_dead_letter(js, x.seq) for x in listing.letters]
        return len(letters) == 5
    await eventually(five_letters)
    assert count("audit") == 5 and count("broken") == 15
    assert {x.reason for x in letters} == {"max_deliver"}
    assert letters[0].headers["Fn-Original-Subject"] == "orders.created"
    assert letters[0].headers["Fn-Trigger"] == "orders-all"
    events.fixed["value"] = True
    for letter in letters:
        await dlq.replay(nc, js, letter)
    await eventually(lambda: count("broken") == 20)
    replayed = events.seen["broken"][-1]
    assert replayed["subject"] == "orders.created" and replayed["trigger"] == "orders-all"
    assert count("audit") == 5   # the replay ran that function only


async def test_output_triggers_the_next_function_once_despite_retries(runtime: Any, nc: NATS) -> None:
    await runtime({"trust": ("tests",)},
                  shaky=fn("shaky", "shaky", "triggers:\n  - subject: orders.>\noutput: audit.logged\n"),
                  after=fn("after", "after", "triggers:\n  - subject: audit.logged\n"))
    for i in range(10):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    await eventually(lambda: count("after") == 10 and count("shaky") == 30)
    shaky_ids = {s["call_id"] for s in events.seen["shaky"]}
    assert {s["caused_by"] for s in events.seen["after"]} == shaky_ids
    assert sorted(s["event"]["from"]["id"] for s in events.seen["after"]) == list(range(10))
