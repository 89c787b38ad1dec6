"""The example functions (functions/ + manifests/), tested the way their authors would: with the fixtures."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from runtime import InvalidInput, Rejected, UnknownFunction
from runtime.pytest_plugin import Caller
from runtime.testing import ServedClient

from .conftest import eventually

# ------------------------------------------------------------------ hello: pydantic in, pydantic out


def test_hello_greets(fn_call: Caller) -> None:
    out = fn_call("manifests/hello.yaml", {"name": "Ada"})
    assert out.result == {"greeting": "Hello, Ada!"} and out.published == () and out.invoked == ()


def test_hello_needs_a_name(fn_call: Caller) -> None:
    out = fn_call("manifests/hello.yaml", {"name": 42})
    assert out.dead_letter is not None and out.dead_letter.reason == "invalid_input"
    assert out.dead_letter.error.message == "name: Input should be a valid string"


def test_hello_logs_its_attempt(fn_call: Caller, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="runtime.fn.hello")
    fn_call("manifests/hello.yaml", {"name": "Ada"}, attempt=2)
    assert "greeting Ada (attempt 2)" in caplog.messages


# ------------------------------------------------------------------ flaky: retries with backoff


@pytest.mark.parametrize("attempt,retry_in", [(1, 0.5), (2, 2.0), (3, 2.0)])
def test_flaky_fails_until_its_turn_and_is_retried_after_the_backoff(fn_call: Caller, attempt: int,
                                                                     retry_in: float) -> None:
    out = fn_call("manifests/flaky.yaml", {"succeed_on": 4}, attempt=attempt)
    assert out.retry_in == retry_in
    assert out.error is not None and out.error.type == "ConnectionError"


def test_flaky_succeeds_on_its_turn(fn_call: Caller) -> None:
    assert fn_call("manifests/flaky.yaml", {"succeed_on": 4}, attempt=4).result == {"attempts": 4}


def test_flaky_gives_up_after_its_fourth_attempt(fn_call: Caller) -> None:
    out = fn_call("manifests/flaky.yaml", {"succeed_on": 5}, attempt=4)
    assert out.dead_letter is not None and out.dead_letter.reason == "max_deliver"


async def test_flaky_rejects_at_once(fn_call: Caller) -> None:
    out = await fn_call.acall("manifests/flaky.yaml", {"reject": True}, attempt=1)
    assert out.dead_letter is not None and out.dead_letter.reason == "rejected"
    assert out.dead_letter.error.message == "asked to reject"


# ------------------------------------------------------------------ primes: CPU-bound, in a thread


@pytest.mark.parametrize("limit,count,largest", [(2, 1, 2), (10, 4, 7), (100, 25, 97), (7919, 1000, 7919)])
def test_primes_counts(fn_call: Caller, limit: int, count: int, largest: int) -> None:
    assert fn_call("manifests/primes.yaml", {"limit": limit}).result == {"limit": limit, "count": count,
                                                                         "largest": largest}


def test_primes_refuses_limits_out_of_range(fn_call: Caller) -> None:
    for limit in (1, 5_000_001):
        out = fn_call("manifests/primes.yaml", {"limit": limit})
        assert out.dead_letter is not None and out.dead_letter.reason == "invalid_input", limit


def test_primes_past_its_timeout_is_retried_once_then_dead_lettered(fn_call: Caller) -> None:
    first = fn_call("manifests/primes.yaml", {"limit": 1_000_000}, timeout="1ms")
    assert first.retry_in == 5.0 and first.error is not None and first.error.code == 504
    last = fn_call("manifests/primes.yaml", {"limit": 1_000_000}, attempt=2, timeout="1ms")
    assert last.dead_letter is not None and last.dead_letter.reason == "timeout"


# ------------------------------------------------------------------ report: an LLM call (test_llm.py serves it)


def test_report_without_an_api_key_is_rejected_saying_why(fn_call: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = fn_call("manifests/report.yaml", {"text": "JetStream keeps every invocation."})
    assert out.dead_letter is not None and out.dead_letter.reason == "rejected"
    assert out.dead_letter.error.message.startswith("OPENAI_API_KEY is not set")


def test_report_needs_a_text_and_a_known_style(fn_call: Caller) -> None:
    out = fn_call("manifests/report.yaml", {"text": "", "style": "long"})
    assert out.dead_letter is not None and out.dead_letter.reason == "invalid_input"
    assert out.dead_letter.error.message == ("text: String should have at least 1 character; "
                                             "style: Input should be 'brief' or 'detailed'")


# ------------------------------------------------------------------ audit, invoice, notify: one event, three functions

ORDER = {"id": 7, "customer": "ada@example.com", "items": [{"sku": "A1", "quantity": 2, "price": 9.5},
                                                           {"sku": "B2", "price": 1.25}]}


def test_invoice_totals_an_order(fn_call: Caller) -> None:
    out = fn_call("manifests/invoice.yaml", ORDER)
    assert out.result == {"number": "INV-7", "order": 7, "customer": "ada@example.com", "total": 20.25}


def test_invoice_refuses_an_order_without_a_customer(fn_call: Caller) -> None:
    out = fn_call("manifests/invoice.yaml", {"id": 8, "items": []})
    assert out.dead_letter is not None and out.dead_letter.reason == "invalid_input"
    assert out.dead_letter.error.message == "customer: Field required"


def test_notify_names_the_invoice_call(fn_call: Caller) -> None:
    invoice = {"number": "INV-7", "order": 7, "customer": "ada@example.com", "total": 20.25}
    out = fn_call("manifests/notify.yaml", invoice, headers={"Fn-Call-Id": "ev-invoice-new-order-1"})
    assert out.result == {"to": "ada@example.com", "text": "Invoice INV-7 for order 7: 20.25 due.",
                          "issued_by": "ev-invoice-new-order-1"}


async def test_one_order_event_runs_audit_and_invoice_and_the_invoice_runs_notify(
        fn_serve: ServedClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="runtime.fn")
    nc = await nats.connect(fn_serve.url)
    try:
        issued: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_invoice(msg: Msg) -> None:
            await issued.put(msg)
        await nc.subscribe("invoices.issued", cb=on_invoice)
        await nc.publish("orders.created", json.dumps(ORDER).encode())   # a plain NATS publish
        invoice = await asyncio.wait_for(issued.get(), timeout=10)
    finally:
        await nc.close()
    assert json.loads(invoice.data) == {"number": "INV-7", "order": 7, "customer": "ada@example.com",
                                        "total": 20.25}
    assert invoice.headers is not None and invoice.headers["Fn-Function"] == "invoice"
    emitted_by = invoice.headers["Fn-Call-Id"]

    def logged(name: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == f"runtime.fn.{name}"]

    await eventually(lambda: logged("notify") and logged("audit"), message="notify and audit to run")
    assert logged("audit") == ["recorded orders.created (trigger orders-all)"]
    assert logged("invoice") == ["invoice INV-7 of order 7: 20.25"]
    assert logged("notify") == ["notified ada@example.com of INV-7"]
    assert emitted_by.startswith("ev-invoice-new-order-")


# ------------------------------------------------------------------ all of them, served for real


async def test_the_examples_served(fn_serve: ServedClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert await fn_serve.invoke("hello", {"name": "Ada"}, timeout=5) == {"greeting": "Hello, Ada!"}
    assert await fn_serve.invoke("primes", {"limit": 100}, timeout=5) == {"limit": 100, "count": 25, "largest": 97}
    with pytest.raises(InvalidInput, match="name: Field required"):
        await fn_serve.invoke("hello", {}, timeout=5)
    with pytest.raises(Rejected, match="asked to reject"):
        await fn_serve.invoke("flaky", {"reject": True}, timeout=5)
    with pytest.raises(Rejected, match="OPENAI_API_KEY is not set"):   # served without a key, refused with why
        await fn_serve.invoke("report", {"text": "JetStream keeps every invocation."}, timeout=5)


@pytest.mark.fn_serve("manifests/flaky.yaml")
async def test_flaky_served_is_retried_until_it_succeeds(fn_serve: ServedClient) -> None:
    result: Any = await fn_serve.invoke("flaky", {"succeed_on": 2}, timeout=10)
    assert result == {"attempts": 2}
    with pytest.raises(UnknownFunction):
        await fn_serve.invoke("hello", {"name": "Ada"}, timeout=5)
