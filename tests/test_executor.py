"""The executor carries out each attempt with the settings the attempt started with."""

from __future__ import annotations

import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.dlq import list_dead_letters
from runtime.manifest import FunctionManifest, parse_manifest
from runtime.results import fetch_response

from .conftest import RuntimeFactory, collect, eventually

HELD = "name: held\nhandler: tests.handlers.outcomes:held\nstore_results: true\n"


async def test_a_deploy_during_an_attempt_does_not_change_how_it_fails(runtime: RuntimeFactory, nc: NATS,
                                                                        js: JetStreamContext) -> None:
    rt = await runtime(held=HELD)
    started, _ = await collect(nc, "test.events.held")
    await js.publish("fn.invoke.held", b"{}", headers={"Nats-Msg-Id": "held-1"})
    await eventually(lambda: started, message="the attempt to start")
    # A deploy while the attempt runs: later invocations keep no outcome; this one still does.
    manifest = parse_manifest(yaml.safe_load(HELD), "held")
    assert isinstance(manifest, FunctionManifest)
    await rt.apply(manifest.model_copy(update={"store_results": False}))
    await nc.publish("test.release.held-1", b"")
    [letter] = await eventually(lambda: list_dead_letters(nc, js), message="the dead letter")
    assert letter.reason == "rejected" and letter.function == "held"
    stored = await eventually(lambda: fetch_response(js, "held-1"), timeout=3, message="the stored outcome")
    assert stored.error is not None and stored.error.code == 422 and stored.error.message == "released"
