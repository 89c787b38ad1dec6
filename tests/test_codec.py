"""Content types: the media type decides the codec, parameters and letter case do not."""

from __future__ import annotations

import json
from functools import partial

import msgpack
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import codec
from runtime.codec import InputDecoder
from runtime.results import fetch_response

from .conftest import RuntimeFactory, collect, eventually

GREET = "name: greet\nhandler: tests.handlers.core:greet\n"


@pytest.mark.parametrize("content_type", [
    "application/msgpack",
    "application/x-msgpack",
    "application/vnd.msgpack",
    "Application/MsgPack",
    "  application/x-msgpack ; charset=binary",
    "APPLICATION/VND.MSGPACK;x=1",
])
def test_msgpack_media_types(content_type: str) -> None:
    assert codec.is_msgpack(content_type)
    assert codec.decode(msgpack.packb({"a": 1}), content_type) == {"a": 1}


@pytest.mark.parametrize("content_type", [
    None,
    "",
    "application/json",
    "application/json; note=x",
    "application/json; note=msgpack",
    'application/json; profile="application/msgpack"',
    "text/plain; charset=msgpack",
    "application/msgpack-ish",
    "application/x-msgpack2",
    "msgpack",
])
def test_everything_else_is_json(content_type: str | None) -> None:
    assert not codec.is_msgpack(content_type)
    assert codec.decode(b'{"a": 1}', content_type) == {"a": 1}
    assert InputDecoder(dict).decode(b'{"a": 1}', content_type) == {"a": 1}


def test_media_type_drops_parameters_and_case() -> None:
    assert codec.media_type(" Application/JSON ; charset=UTF-8") == "application/json"
    assert codec.media_type(None) == ""


async def test_json_with_parameters_reaches_the_handler_as_json(runtime: RuntimeFactory, nc: NATS,
                                                                js: JetStreamContext) -> None:
    await runtime(greet=GREET)
    seen, _ = await collect(nc, "test.events.greet")
    sent = {
        "ada": ("application/json; note=x", json.dumps({"name": "ada"}).encode()),
        "bob": ("application/json; note=msgpack", json.dumps({"name": "bob"}).encode()),
        "cy": (" Application/X-MsgPack ; charset=binary", msgpack.packb({"name": "cy"})),
    }
    for name, (content_type, body) in sent.items():
        await js.publish("fn.invoke.greet", body, headers={"Content-Type": content_type, "Nats-Msg-Id": name})
    await eventually(lambda: len(seen) == len(sent), timeout=5, message="every body to be decoded")
    assert sorted(json.loads(m.data)["name"] for m in seen) == sorted(sent)
    for name in sent:
        response = await eventually(partial(fetch_response, js, name), timeout=5)
        assert response.value() == {"greeting": f"Hello, {name}!"}
