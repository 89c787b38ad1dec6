"""runtime.testing.call agrees with a real runtime on every row of the README's outcome table.

Each case runs once through ``call()`` and once through a runtime on a real server. The
runtime's decision is read off the wire, as JetStream receives it: the ack verb on the
message's ``$JS.ACK`` subject (``+ACK``, ``-NAK {"delay": ns}``, ``+TERM reason``), the
attempt's error as recorded in ``fn_errors``, and the stored outcome.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.manifest import FunctionManifest, parse_manifest
from runtime.policy import Ack, RetryAfter
from runtime.results import fetch_response
from runtime.testing import Outcome, acall

from .conftest import ROOT, RuntimeFactory, collect, eventually

HANDLERS = "tests.handlers.outcomes"


@dataclass(frozen=True)
class Case:
    handler: str
    payload: Any
    settings: dict[str, Any] = field(default_factory=dict)

    def manifest_yaml(self, name: str) -> str:
        settings = {"retry": {"max_deliver": 3, "backoff": ["200ms", "1s"]}, **self.settings}
        return yaml.safe_dump({"name": name, "handler": f"{HANDLERS}:{self.handler}", **settings})


ONCE = {"retry": {"max_deliver": 1}}

# The README's outcome table, row by row (its first column), and the cases that check it.
CASES: dict[str, list[Case]] = {
    "returns": [Case("returns", {"name": "Ada"})],
    "gets input that does not decode or validate": [Case("returns", {"age": "old"})],
    "raises any other exception": [Case("raises", {"n": 1}), Case("raises", {"n": 2}, ONCE)],
    "raises `Retry(delay=5)`": [Case("retries", {})],
    'raises `Reject("reason")`': [Case("rejects", {})],
    "runs past `timeout`": [Case("sleeps", {"seconds": 30}, {"timeout": "150ms"}),
                            Case("sleeps", {"seconds": 30}, {"timeout": "150ms", **ONCE})],
    "blocks the event loop (`time.sleep` in `async def`) past `timeout`": [
        Case("blocks", {"seconds": 0.3}, {"timeout": "100ms", **ONCE})],
    "returns something that cannot be encoded (an object, `NaN` in JSON)": [
        Case("unencodable", {"kind": "object"}), Case("unencodable", {"kind": "nan"}, ONCE)],
    "returns a result too large for one message": [Case("too_large", {}), Case("too_large", {}, ONCE)],
    "raises `SystemExit` or `KeyboardInterrupt`": [Case("exits", {"how": "exit"}),
                                                   Case("exits", {"how": "interrupt"}, ONCE)],
    "runs long": [Case("sleeps", {"seconds": 0.4}, {"timeout": "10s", "ack_wait": "150ms"})],
}


def readme_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Outcomes"):].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]   # past header and rule
    return [row.split("|")[1].strip() for row in rows]


def test_every_row_of_the_readme_table_has_cases() -> None:
    assert readme_rows() == list(CASES)


def _seconds(text: str) -> str:
    # How long a blocked attempt took varies by a few milliseconds between the two runs.
    return re.sub(r"took \d+\.\d+s", "took #s", text)


def decision_of(out: Outcome) -> tuple[Any, ...]:
    """What call() decided, in the terms the wire shows."""
    if isinstance(out.decision, Ack):
        return ("ack", out.result)
    assert out.error is not None
    if isinstance(out.decision, RetryAfter):
        return ("retry", out.decision.delay, _seconds(out.error.described))
    return ("dead_letter", out.decision.reason, _seconds(out.error.described), out.error.code)


async def decision_on_the_wire(nc: NATS, js: JetStreamContext, name: str, payload: Any,
                               call_id: str) -> tuple[tuple[Any, ...], list[bytes]]:
    """What the runtime did with one invocation of ``name``, and every ack verb it sent."""
    verbs, _ = await collect(nc, f"$JS.ACK.FN.{name}.>")
    recorded, _ = await collect(nc, "$KV.fn_errors.>")
    await js.publish(f"fn.invoke.{name}", json.dumps(payload).encode(), headers={"Nats-Msg-Id": call_id})
    verb: bytes = await eventually(lambda: next((m.data for m in verbs if m.data != b"+WPI"), None),
                                   message="the runtime's decision")
    sent = [m.data for m in verbs]
    if verb == b"+ACK":
        stored = await eventually(lambda: fetch_response(js, call_id))
        return ("ack", stored.value()), sent
    if verb.startswith(b"-NAK"):
        delay = json.loads(verb[4:])["delay"] / 1e9 if verb[4:].strip() else 0.0
        await eventually(lambda: recorded, message="the attempt's recorded error")
        return ("retry", delay, _seconds(json.loads(recorded[0].data)["error"])), sent
    assert verb.startswith(b"+TERM "), verb
    stored = await eventually(lambda: fetch_response(js, call_id))
    error = stored.error
    assert error is not None
    return ("dead_letter", verb[6:].decode(), _seconds(error.described), error.code), sent


@pytest.mark.parametrize("row,case", [pytest.param(row, case, id=f"{row} [{case.handler} {json.dumps(case.payload)}"
                                                                  f"{' once' if case.settings.get('retry') else ''}]")
                                      for row, cases in CASES.items() for case in cases])
async def test_call_and_the_runtime_decide_alike(row: str, case: Case, runtime: RuntimeFactory, nc: NATS,
                                               js: JetStreamContext) -> None:
    name = case.handler.replace("_", "-")
    text = case.manifest_yaml(name)
    manifest = parse_manifest(yaml.safe_load(text), "case")
    assert isinstance(manifest, FunctionManifest)
    call_id = f"agree-{name}"

    expected = decision_of(await acall(manifest, case.payload, call_id=call_id, root=ROOT,
                                       max_payload=nc.max_payload))
    await runtime(**{name: text})
    seen, verbs = await decision_on_the_wire(nc, js, name, case.payload, call_id)

    assert seen == expected
    if row == "runs long":
        assert b"+WPI" in verbs, "kept alive with in-progress acks while it ran"
