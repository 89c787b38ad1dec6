"""One error describer and one validation formatter, whoever reports the error."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from runtime.cli.common import describe as cli_describe
from runtime.durations import Duration
from runtime.errors import (
    ConfigError,
    FunctionError,
    InvalidInput,
    InvocationTimeout,
    LoadError,
    ManifestError,
    describe,
)
from runtime.manifest import load_manifest
from runtime.policy import DeadLetter, Undecodable, decide
from runtime.settings import Settings
from runtime.testing import call

MANIFEST = load_manifest(Path(__file__).resolve().parent.parent / "manifests" / "hello.yaml")


class APIError(Exception):
    """Like nats-py's, whose messages name their own type."""


def test_describe_is_type_and_message_on_one_bounded_line() -> None:
    assert describe(ValueError("boom")) == "ValueError: boom"
    assert describe(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert describe(ValueError("two\nlines\t here")) == "ValueError: two lines here"
    assert describe(ValueError("x" * 10_000)).endswith("…") and len(describe(ValueError("x" * 10_000))) < 4200
    assert describe(ValueError("x" * 100), limit=10) == "ValueError: xxxxxxxxx…"


def test_describe_never_repeats_a_type_the_message_names() -> None:
    assert describe(FunctionError("ValueError: boom", type="ValueError")) == "ValueError: boom"
    assert describe(APIError("nats: APIError: code=503 description=no space")) == \
        "nats: APIError: code=503 description=no space"


def test_invocation_errors_are_described_by_their_wire_type() -> None:
    error = InvocationTimeout("attempt exceeded the timeout of 1s", type="InvocationTimeout")
    assert describe(error) == error.described == "InvocationTimeout: attempt exceeded the timeout of 1s"
    assert InvalidInput("", type="ValidationError").described == "ValidationError"


def test_the_command_line_says_what_failed_in_one_line() -> None:
    assert cli_describe(ManifestError("m.yaml", [("timeout", "must be greater than zero")])) == \
        "m.yaml: timeout: must be greater than zero"
    assert cli_describe(LoadError("module 'x' has no attribute 'y'")) == "module 'x' has no attribute 'y'"
    assert cli_describe(ConnectionRefusedError("Connect call failed")) == \
        "cannot connect to the NATS server (Connect call failed)"
    assert cli_describe(TimeoutError()) == "TimeoutError"
    assert cli_describe(KeyError("fn")) == "KeyError: 'fn'"
    assert cli_describe(APIError("nats: APIError: code=404")) == "nats: APIError: code=404"


# ------------------------------------------------------------------ validation problems, formatted once


class Job(BaseModel):
    timeout: Duration
    items: list[dict[str, int]] = []


def input_message(data: object) -> str:
    try:
        Job.model_validate(data)
    except Exception as exc:
        decision = decide(Undecodable(exc), 1, MANIFEST)
        assert isinstance(decision, DeadLetter)
        return decision.error.message
    raise AssertionError("expected invalid input")


def test_a_bad_duration_reads_the_same_in_a_manifest_in_settings_and_in_an_input(tmp_path: Path) -> None:
    problem = "timeout: 'soon' is not a duration; use e.g. 250ms, 30s, 5m or 1h"
    path = tmp_path / "f.yaml"
    path.write_text("name: f\nhandler: m:f\ntimeout: soon\n")
    with pytest.raises(ManifestError) as manifest_error:
        load_manifest(path)
    assert str(manifest_error.value) == f"{path}: {problem}"
    with pytest.raises(ConfigError) as settings_error:
        Settings.from_env(grace="soon")
    assert str(settings_error.value) == f"invalid settings: {problem.replace('timeout', 'grace')}"
    assert input_message({"timeout": "soon"}) == problem


def test_nested_fields_and_unknown_fields_read_the_same_everywhere() -> None:
    assert input_message({"timeout": "1s", "items": [{"x": 1}, {"y": "z"}]}) == \
        "items[1].y: Input should be a valid integer, unable to parse string as an integer"
    with pytest.raises(ConfigError, match=r"^invalid settings: colour: unknown field$"):
        Settings.from_env(colour="blue")


def test_many_problems_are_counted_and_the_first_twenty_listed() -> None:
    message = input_message({"timeout": "1s", "items": [{"x": "bad"}] * 25})
    assert message.startswith("25 problems, the first 20 follow; items[0].x: ")
    assert message.count("items[") == 20


def test_an_invalid_input_of_a_real_function_names_its_field() -> None:
    out = call(MANIFEST, {"name": ["not", "a", "string"]})
    assert out.dead_letter is not None and out.dead_letter.error.message == "name: Input should be a valid string"
