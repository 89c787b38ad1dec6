"""Triggers without a server: subject patterns, manifest checks, which stream a trigger binds to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, DeliverPolicy, RetentionPolicy, StreamConfig, StreamInfo, StreamState

from runtime.errors import ConfigError, ManifestError
from runtime.manifest import (
    MAX_NAME,
    MAX_TRIGGERS,
    NAME_PATTERN,
    FunctionManifest,
    ManifestSet,
    TriggerManifest,
    TriggerSpec,
    parse_manifest,
    with_triggers,
)
from runtime.subjects import conflicts, covers, minimal_cover, name_for, overlaps, pattern_problem
from runtime.triggers import (
    EVENT_RETENTION,
    TRIGGERS_STREAM,
    Binding,
    TriggerError,
    choose_stream,
    consumer_name,
    parse_consumer,
    trigger_consumer_config,
    triggers_stream_config,
)

# ------------------------------------------------------------------ subjects.pattern_problem


@pytest.mark.parametrize("pattern", ["orders", "orders.created", "orders.*", "orders.>", "*.created", "a.*.c.>",
                                     "payments.settled.*", "Orders-2024_x.y", "fnx.y", "fn_x", "inbox.x",
                                     "x" * 256])
def test_patterns_a_trigger_may_use(pattern: str) -> None:
    assert pattern_problem(pattern) is None


@pytest.mark.parametrize(("pattern", "problem"), [
    ("", "empty"),
    ("x" * 257, "longer than 256"),
    ("orders created", "whitespace"),
    ("orders.\tcreated", "whitespace"),
    ("orders.\x00", "control"),
    ("orders..created", "empty token"),
    (".orders", "empty token"),
    ("orders.", "empty token"),
    ("orders.>.created", "'>' may only be the last token"),
    ("orders.cre*", "mixes a wildcard"),
    ("orders.>x", "mixes a wildcard"),
    (">", "matches every subject"),
    ("*", "matches every subject"),
    ("*.>", "matches every subject"),
    ("*.*", "matches every subject"),
    ("$JS.API.>", "belong to NATS and the runtime"),
    ("$SYS.x", "belong to NATS and the runtime"),
    ("_INBOX.abc", "belong to NATS and the runtime"),
    ("fn.invoke.hello", "belong to NATS and the runtime"),
    ("fn.>", "belong to NATS and the runtime"),
    ("fn", "belong to NATS and the runtime"),
])
def test_patterns_a_trigger_may_not_use(pattern: str, problem: str) -> None:
    found = pattern_problem(pattern)
    assert found is not None and problem in found, found


# ------------------------------------------------------------------ overlaps and covers


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("orders.created", "orders.created", True),
    ("orders.created", "orders.cancelled", False),
    ("orders.*", "orders.created", True),
    ("orders.>", "orders.created.eu", True),
    ("orders.>", "orders", False),              # '>' needs at least one more token
    ("orders.*", "orders", False),
    ("orders.*", "orders.created.eu", False),
    ("orders.*.eu", "orders.created.*", True),   # orders.created.eu
    ("a.*.c", "a.b.*", True),
    ("a.*.c", "a.b.d", False),
    ("*.created", "orders.>", True),
    ("payments.>", "payments.settled.>", True),
    ("payments.>", "orders.>", False),
    ("a.b", "a.b.c", False),
    ("a.>", "b.>", False),
])
def test_overlaps(a: str, b: str, expected: bool) -> None:
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected, "overlapping is symmetric"


@pytest.mark.parametrize(("wide", "narrow", "expected"), [
    ("orders.created", "orders.created", True),
    ("orders.*", "orders.created", True),
    ("orders.*", "orders.*", True),
    ("orders.>", "orders.created", True),
    ("orders.>", "orders.*.eu", True),
    ("orders.>", "orders.>", True),
    ("orders.>", "orders.*", True),
    ("orders.>", "orders", False),
    ("orders.*", "orders.>", False),             # orders.a.b is not matched by orders.*
    ("orders.created", "orders.*", False),
    ("orders.*", "orders.created.eu", False),
    ("orders.*.eu", "orders.created.*", False),  # overlap only
    ("payments.settled.>", "payments.>", False),
    ("payments.>", "payments.settled.>", True),
    ("*.created", "orders.created", True),
    ("a.*.c", "a.b", False),
    ("a.b", "a.b.c", False),
])
def test_covers(wide: str, narrow: str, expected: bool) -> None:
    assert covers(wide, narrow) is expected
    if expected:
        assert overlaps(wide, narrow), "a pattern that covers another overlaps it"


def test_minimal_cover_keeps_only_the_widest_patterns_sorted() -> None:
    assert minimal_cover(["orders.created", "orders.*", "orders.>", "payments.x", "orders.*"]) == \
        ["orders.>", "payments.x"]
    assert minimal_cover(["b.x", "a.x"]) == ["a.x", "b.x"]
    assert minimal_cover([]) == []
    # Overlapping without covering: both kept, for conflicts() to name.
    assert minimal_cover(["a.*.c", "a.b.*"]) == ["a.*.c", "a.b.*"]


def test_conflicts_names_pairs_one_stream_cannot_capture() -> None:
    assert conflicts(["a.*.c", "a.b.*", "x.y"]) == [("a.*.c", "a.b.*")]
    assert conflicts(["orders.>", "orders.*", "orders.created"]) == []
    assert conflicts(["a.b", "a.c"]) == []


# ------------------------------------------------------------------ subjects.name_for


@pytest.mark.parametrize(("pattern", "name"), [
    ("orders.>", "orders-all"),
    ("payments.settled.*", "payments-settled-any"),
    ("orders.created", "orders-created"),
    ("a.*.b", "a-any-b"),
    ("Orders.Created", "orders-created"),
    ("orders.créé", "orders-cr"),     # characters a name cannot hold become a dash; trailing ones go
    ("_private.x", "private-x"),
    ("é.ü", "trigger"),
])
def test_name_for(pattern: str, name: str) -> None:
    assert name_for(pattern) == name


@pytest.mark.parametrize("pattern", ["orders.>", "x" * 256, ".".join(["ab"] * 80), "A.B.C", "-x.y", "é.ü", "a_.b"])
def test_names_made_from_subjects_are_valid_trigger_names(pattern: str) -> None:
    name = name_for(pattern)
    assert re.match(NAME_PATTERN, name) and len(name) <= MAX_NAME, name
    TriggerSpec(subject="orders.created", name=name)   # accepted as an explicit name too


# ------------------------------------------------------------------ manifests


def function(**fields: Any) -> FunctionManifest:
    manifest = parse_manifest({"name": "audit", "handler": "functions.audit:main", **fields}, "audit.yaml")
    assert isinstance(manifest, FunctionManifest)
    return manifest


def problems(**fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as caught:
        function(**fields)
    assert str(caught.value).startswith("audit.yaml: ")
    return caught.value.problems


def test_triggers_and_output_as_a_user_writes_them() -> None:
    manifest = function(triggers=[{"subject": "orders.>"}, {"stream": "PAYMENTS", "subject": "payments.settled.*"},
                                  {"subject": "refunds.*", "name": "refunds"}],
                        output="audit.logged")
    assert [(t.trigger_name, t.stream) for t in manifest.triggers] == \
        [("orders-all", None), ("payments-settled-any", "PAYMENTS"), ("refunds", None)]
    assert manifest.output == "audit.logged"
    assert function().triggers == [] and function().output is None


@pytest.mark.parametrize(("subject", "problem"), [
    (">", "matches every subject"),
    ("*.>", "matches every subject"),
    ("fn.invoke.audit", "belong to NATS and the runtime"),
    ("$JS.EVENT.>", "belong to NATS and the runtime"),
    ("_INBOX.x", "belong to NATS and the runtime"),
    ("orders..x", "empty token"),
    ("orders.>.x", "may only be the last token"),
    ("orders created", "whitespace"),
    ("", "empty"),
])
def test_a_bad_trigger_subject_is_refused_with_its_field(subject: str, problem: str) -> None:
    [(field, message)] = problems(triggers=[{"subject": "ok.x"}, {"subject": subject}])
    assert field == "triggers[1].subject"
    assert "cannot be a trigger subject" in message and problem in message, message


def test_a_trigger_subject_too_long_is_refused() -> None:
    [(field, _)] = problems(triggers=[{"subject": "x" * 300}])
    assert field == "triggers[0].subject"


@pytest.mark.parametrize("name", ["Orders", "-orders", "orders created", "orders.created", "x" * (MAX_NAME + 1), ""])
def test_a_bad_trigger_name_is_refused(name: str) -> None:
    [(field, _)] = problems(triggers=[{"subject": "orders.>", "name": name}])
    assert field == "triggers[0].name"


@pytest.mark.parametrize("stream", ["FN", "FN_TRIGGERS", "FN_DLQ", "KV_fn_manifests", "OBJ_fn_dlq_bodies"])
def test_a_trigger_may_not_name_a_stream_of_the_runtime(stream: str) -> None:
    [(field, message)] = problems(triggers=[{"subject": "orders.>", "stream": stream}])
    assert field == "triggers[0].stream" and "runtime's own streams" in message, message


@pytest.mark.parametrize("stream", ["PAY MENTS", "pay.ments", "x" * 65, "PAY>"])
def test_a_trigger_stream_must_be_a_stream_name(stream: str) -> None:
    [(field, _)] = problems(triggers=[{"subject": "orders.>", "stream": stream}])
    assert field == "triggers[0].stream"


def test_an_unknown_trigger_field_is_refused() -> None:
    assert problems(triggers=[{"subject": "orders.>", "filter": "x"}]) == [("triggers[0].filter", "unknown field")]


def test_a_trigger_needs_a_subject() -> None:
    [(field, _)] = problems(triggers=[{"stream": "PAYMENTS"}])
    assert field == "triggers[0].subject"


def test_too_many_triggers_are_refused() -> None:
    [(field, _)] = problems(triggers=[{"subject": f"s{i}.x"} for i in range(MAX_TRIGGERS + 1)])
    assert field == "triggers"
    assert len(function(triggers=[{"subject": f"s{i}.x"} for i in range(MAX_TRIGGERS)]).triggers) == MAX_TRIGGERS


@pytest.mark.parametrize(("triggers", "repeated"), [
    ([{"subject": "orders.>"}, {"subject": "orders.>"}], "orders-all"),
    ([{"subject": "a.x", "name": "same"}, {"subject": "b.x", "name": "same"}], "same"),
    ([{"subject": "orders.*"}, {"subject": "orders.any"}], "orders-any"),       # made names can meet
    ([{"subject": "orders.created", "name": "orders-all"}, {"subject": "orders.>"}], "orders-all"),
])
def test_repeated_trigger_names_are_refused(triggers: list[dict[str, str]], repeated: str) -> None:
    [(field, message)] = problems(triggers=triggers)
    assert "trigger names repeat" in message and repeated in message and "name:" in message, (field, message)


@pytest.mark.parametrize(("output", "problem"), [
    ("audit.*", "wildcard"),
    ("audit.>", "wildcard"),
    ("fn.invoke.other", "belong to NATS and the runtime"),
    ("$JS.API.STREAM.DELETE.FN", "belong to NATS and the runtime"),
    ("_INBOX.abc", "belong to NATS and the runtime"),
    ("audit..logged", "empty token"),
    ("audit logged", "whitespace"),
    ("", "empty"),
])
def test_a_bad_output_subject_is_refused(output: str, problem: str) -> None:
    [(field, message)] = problems(output=output)
    assert field == "output" and "cannot be an output subject" in message and problem in message, message


def test_a_standalone_trigger_manifest() -> None:
    manifest = parse_manifest({"kind": "Trigger", "name": "audit-refunds", "function": "audit",
                               "subject": "refunds.>", "stream": "REFUNDS"}, "t.yaml")
    assert isinstance(manifest, TriggerManifest)
    assert manifest.spec() == TriggerSpec(subject="refunds.>", stream="REFUNDS", name="audit-refunds")


@pytest.mark.parametrize(("fields", "field"), [
    ({"function": "audit", "subject": "refunds.>"}, "name"),                      # a standalone one needs a name
    ({"name": "t", "subject": "refunds.>"}, "function"),
    ({"name": "t", "function": "audit"}, "subject"),
    ({"name": "t", "function": "audit", "subject": ">"}, "subject"),
    ({"name": "T", "function": "audit", "subject": "refunds.>"}, "name"),
    ({"name": "t", "function": "Audit!", "subject": "refunds.>"}, "function"),
    ({"name": "t", "function": "audit", "subject": "refunds.>", "stream": "FN"}, "stream"),
    ({"name": "t", "function": "audit", "subject": "refunds.>", "output": "x.y"}, "output"),
])
def test_a_bad_standalone_trigger_is_refused(fields: dict[str, str], field: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"kind": "Trigger", **fields}, "t.yaml")
    assert [f for f, _ in caught.value.problems] == [field], caught.value.problems


def write(directory: Path, **manifests: str) -> Path:
    directory.mkdir()
    for name, text in manifests.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


AUDIT = "name: audit\nhandler: functions.audit:main\ntriggers:\n  - subject: orders.>\n"
REFUNDS = "kind: Trigger\nname: refunds\nfunction: {function}\nsubject: refunds.>\n"


def test_a_trigger_of_an_unknown_function_is_refused(tmp_path: Path) -> None:
    directory = write(tmp_path / "m", audit=AUDIT, refunds=REFUNDS.format(function="billing"))
    with pytest.raises(ManifestError) as caught:
        ManifestSet.load([directory])
    assert caught.value.path.endswith("refunds.yaml")
    assert caught.value.problems == [("function", "unknown function 'billing'")]
    # A function deployed earlier is known.
    loaded = ManifestSet.load([directory], known_functions=["billing"])
    assert list(loaded.triggers) == ["refunds"] and list(loaded.functions) == ["audit"]


def test_a_standalone_trigger_named_like_one_of_the_functions_own_is_refused(tmp_path: Path) -> None:
    clash = "kind: Trigger\nname: orders-all\nfunction: audit\nsubject: orders.created\n"
    with pytest.raises(ManifestError) as caught:
        ManifestSet.load([write(tmp_path / "m", audit=AUDIT, clash=clash)])
    [(field, message)] = caught.value.problems
    assert field == "name" and "already has a trigger named 'orders-all'" in message


def test_two_standalone_triggers_with_one_name_are_refused(tmp_path: Path) -> None:
    directory = write(tmp_path / "m", audit=AUDIT, a=REFUNDS.format(function="audit"),
                      b=REFUNDS.format(function="audit"))
    with pytest.raises(ManifestError, match="already declared"):
        ManifestSet.load([directory])


def test_with_triggers_adds_the_standalone_triggers_of_the_function() -> None:
    audit = function(triggers=[{"subject": "orders.>"}])
    standalone = [TriggerManifest(kind="Trigger", name="zz", function="audit", subject="z.x"),
                  TriggerManifest(kind="Trigger", name="aa", function="audit", subject="a.x", stream="A"),
                  TriggerManifest(kind="Trigger", name="other", function="billing", subject="b.x"),
                  TriggerManifest(kind="Trigger", name="orders-all", function="audit", subject="nope.x")]
    merged = with_triggers(audit, standalone)
    assert [(t.trigger_name, t.subject, t.stream) for t in merged.triggers] == \
        [("orders-all", "orders.>", None), ("aa", "a.x", "A"), ("zz", "z.x", None)]
    assert with_triggers(audit, []) is audit
    assert audit.triggers == [TriggerSpec(subject="orders.>")], "the function's own manifest is unchanged"


# ------------------------------------------------------------------ triggers.choose_stream


def stream(name: str, *subjects: str) -> StreamInfo:
    return StreamInfo(config=StreamConfig(name=name, subjects=list(subjects) or None),
                      state=StreamState(messages=0, bytes=0, first_seq=0, last_seq=0, consumer_count=0))


STREAMS = [stream("FN", "fn.invoke.>", "fn.cancel.>"), stream("KV_fn_manifests", "$KV.fn_manifests.>"),
           stream(TRIGGERS_STREAM, "orders.>"), stream("PAYMENTS", "payments.>"),
           stream("SETTLED", "settled.eu.>", "settled.us.>"), stream("MIRROR")]


def choose(subject: str, stream_name: str | None = None, streams: list[StreamInfo] | None = None) -> str:
    return choose_stream("audit", TriggerSpec(subject=subject, stream=stream_name),
                         STREAMS if streams is None else streams)


@pytest.mark.parametrize(("subject", "named", "chosen"), [
    ("orders.created", None, TRIGGERS_STREAM),        # the runtime's event stream: never a user's
    ("invoices.>", None, TRIGGERS_STREAM),            # captured by no stream yet
    ("payments.settled.*", None, "PAYMENTS"),         # a user's stream that captures all of it
    ("payments.>", None, "PAYMENTS"),
    ("settled.eu.x", None, "SETTLED"),
    ("payments.settled.*", "PAYMENTS", "PAYMENTS"),
    ("settled.us.>", "SETTLED", "SETTLED"),
])
def test_the_stream_a_trigger_binds_to(subject: str, named: str | None, chosen: str) -> None:
    assert choose(subject, named) == chosen


def test_with_no_streams_at_all_the_runtime_captures_the_subject() -> None:
    assert choose("orders.created", streams=[]) == TRIGGERS_STREAM


@pytest.mark.parametrize(("subject", "named", "words"), [
    # A user's stream capturing only part of the subject: name it, with a subject inside it.
    ("settled.*.x", None, ["stream SETTLED", "(stream: SETTLED)", "overlaps", "settled.eu.>"]),
    ("*.eu.x", None, ["stream PAYMENTS", "(stream: PAYMENTS)", "payments.>"]),
    ("settled.>", None, ["stream SETTLED", "(stream: SETTLED)"]),
    # A named stream that is not there, or does not capture all of the subject.
    ("payments.>", "PAYMENT", ["there is no stream PAYMENT"]),
    ("orders.created", "PAYMENTS", ["stream PAYMENTS does not capture every subject of orders.created",
                                    "payments.>"]),
    ("settled.*.x", "SETTLED", ["does not capture every subject", "settled.eu.>, settled.us.>"]),
    ("payments.>", "MIRROR", ["it captures nothing"]),
])
def test_a_trigger_that_cannot_bind_says_which_stream_and_what_to_do(subject: str, named: str | None,
                                                                     words: list[str]) -> None:
    with pytest.raises(TriggerError) as caught:
        choose(subject, named)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError), "the CLI reports it in one line"
    assert message.startswith(f"trigger {name_for(subject)} of audit ({subject}): "), message
    for word in words:
        assert word in message, message


def test_a_users_stream_named_like_the_runtimes_own_is_refused() -> None:
    streams = [stream("FN_LEGACY", "legacy.>")]
    with pytest.raises(TriggerError, match="belongs to the runtime's stream FN_LEGACY"):
        choose("legacy.x", streams=streams)


# ------------------------------------------------------------------ consumers and the event stream


@pytest.mark.parametrize(("name", "parsed"), [
    ("fn_audit_ON_orders-all", ("audit", "orders-all")),
    ("fn_a_b-c_ON_x_y", ("a_b-c", "x_y")),
    ("fn_audit_ON_", None),
    ("fn__ON_orders", None),
    ("fn_audit", None),
    ("audit_ON_orders", None),
    ("audit", None),
    ("fn_audit_on_orders", None),
    ("", None),
])
def test_parse_consumer(name: str, parsed: tuple[str, str] | None) -> None:
    assert parse_consumer(name) == parsed


@pytest.mark.parametrize(("function", "trigger"), [("audit", "orders-all"), ("a_b", "c_d"), ("x" * 64, "y" * 64)])
def test_consumer_names_read_back(function: str, trigger: str) -> None:
    name = consumer_name(function, trigger)
    assert parse_consumer(name) == (function, trigger)
    assert not re.search(r"[.*>\s]", name), "a consumer name may not hold these"


def test_a_trigger_consumer_takes_the_functions_settings() -> None:
    manifest = function(concurrency=7, timeout="5s", retry={"max_deliver": 4})
    binding = Binding("audit", "orders-all", "orders.>", TRIGGERS_STREAM, consumer_name("audit", "orders-all"))
    config = trigger_consumer_config(manifest, binding)
    assert config.durable_name == "fn_audit_ON_orders-all"
    assert config.filter_subject == "orders.>"
    assert config.deliver_policy == DeliverPolicy.NEW
    assert config.ack_policy == AckPolicy.EXPLICIT
    # One delivery more than the attempts, for dead-lettering an event whose last attempt never settled.
    assert (config.max_deliver, config.max_ack_pending, config.ack_wait) == (5, 7, 5.0)
    assert config.inactive_threshold == EVENT_RETENTION
    assert config.metadata == {"fn-function": "audit", "fn-trigger": "orders-all"}
    assert binding.owned and not Binding("a", "t", "p.x", "PAYMENTS", "c").owned


def test_the_event_stream_keeps_events_until_every_trigger_settled_them() -> None:
    config = triggers_stream_config(["orders.>"], 3)
    assert (config.name, config.subjects, config.num_replicas) == (TRIGGERS_STREAM, ["orders.>"], 3)
    assert config.retention == RetentionPolicy.INTEREST
    assert config.max_age == EVENT_RETENTION == 7 * 86400
    assert config.duplicate_window and config.duplicate_window > 0, "outputs are deduplicated by Nats-Msg-Id"


@pytest.mark.parametrize("subject", ["orders.>", "orders.*", "orders.audited"])
def test_an_output_that_would_trigger_its_own_function_is_refused(subject: str) -> None:
    [(field, message)] = problems(triggers=[{"subject": subject}], output="orders.audited")
    assert field == ""   # a rule between two fields: the manifest as a whole
    assert message.startswith("output orders.audited matches the function's own trigger"), message
    assert "without end" in message, message


def test_an_output_beside_its_triggers_is_accepted() -> None:
    manifest = function(triggers=[{"subject": "orders.*"}], output="orders.audited.done")
    assert manifest.output == "orders.audited.done"


def test_a_standalone_trigger_on_its_functions_output_is_refused(tmp_path: Path) -> None:
    looping = REFUNDS.format(function="audit").replace("refunds.>", "audit.logged")
    directory = write(tmp_path / "m", audit=AUDIT + "output: audit.logged\n", refunds=looping)
    with pytest.raises(ManifestError) as caught:
        ManifestSet.load([directory])
    assert caught.value.path.endswith("refunds.yaml")
    [(field, message)] = caught.value.problems
    assert field == "subject" and "audit.logged" in message and "without end" in message


def _fn(name: str, subjects: str = "", output: str | None = None) -> FunctionManifest:
    return FunctionManifest(name=name, handler="tests.handlers.events:audit", output=output,
                            triggers=[TriggerSpec(subject=s) for s in subjects.split()])


def test_a_loop_of_outputs_is_found_however_long() -> None:
    from runtime.triggers import output_loop

    assert output_loop([_fn("a", "x.in", "y.in"), _fn("b", "y.*", "z.in"), _fn("c", "z.>", "x.in")]) == \
        ["a", "b", "c", "a"]
    assert output_loop([_fn("a", "x.in", "y.in"), _fn("b", "y.*", "z.in"), _fn("c", "z.>")]) is None
    assert output_loop([_fn("a", "x.in", "y.in"), _fn("b", "y.in", "x.in"), _fn("lone", "q.in")]) == ["a", "b", "a"]
    assert output_loop([_fn("a", "", "y.in"), _fn("b", "y.in", "x.in")]) is None, "a has no trigger: no loop"
    assert output_loop([]) is None
