"""Provisioning of FN: created and kept with ``discard: new``, the operator's limits left alone."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy
from nats.js.errors import APIError

from runtime.streams import INVOKE_STREAM, invoke_stream_config, provision_base

from .conftest import RuntimeFactory

GREET = "name: greet\nhandler: tests.handlers.core:greet\n"


async def test_a_full_fn_refuses_new_invocations_and_keeps_the_queued_ones(runtime: RuntimeFactory,
                                                                           js: JetStreamContext) -> None:
    # FN as an earlier runtime provisioned it (discard: old), then capped at 5 messages by an operator.
    await js.add_stream(dataclasses.replace(invoke_stream_config(), discard=DiscardPolicy.OLD))
    capped = (await js.stream_info(INVOKE_STREAM)).config
    await js.update_stream(dataclasses.replace(capped, max_msgs=5))

    await runtime(greet=GREET)
    config = (await js.stream_info(INVOKE_STREAM)).config
    assert config.discard == DiscardPolicy.NEW
    assert config.max_msgs == 5, "the operator's limit is kept"

    # Nothing consumes fn.invoke.queued, so its invocations wait in FN.
    for n in range(5):
        await js.publish("fn.invoke.queued", json.dumps({"n": n}).encode())
    with pytest.raises(APIError, match="maximum messages exceeded"):
        await js.publish("fn.invoke.queued", b'{"n": 5}')
    state = (await js.stream_info(INVOKE_STREAM)).state
    assert (state.messages, state.first_seq, state.last_seq) == (5, 1, 5)
    kept = [json.loads((await js.get_msg(INVOKE_STREAM, seq)).data or b"") for seq in range(1, 6)]
    assert kept == [{"n": n} for n in range(5)]


async def test_provisioning_again_changes_nothing(js: JetStreamContext, caplog: pytest.LogCaptureFixture) -> None:
    await provision_base(js)
    assert (await js.stream_info(INVOKE_STREAM)).config.discard == DiscardPolicy.NEW
    with caplog.at_level(logging.INFO, logger="runtime.streams"):
        await provision_base(js)
    assert not [r for r in caplog.records if r.name == "runtime.streams"], "an unchanged stream was updated"


async def test_updating_fn_keeps_every_limit_the_operator_set(js: JetStreamContext) -> None:
    await js.add_stream(dataclasses.replace(invoke_stream_config(), discard=DiscardPolicy.OLD))
    config = (await js.stream_info(INVOKE_STREAM)).config
    await js.update_stream(dataclasses.replace(config, max_msgs=100, max_bytes=1 << 20, max_age=3600.0,
                                               description="capped by ops"))
    await provision_base(js)
    config = (await js.stream_info(INVOKE_STREAM)).config
    assert config.discard == DiscardPolicy.NEW
    assert (config.max_msgs, config.max_bytes, config.max_age, config.description) == (
        100, 1 << 20, 3600.0, "capped by ops")
