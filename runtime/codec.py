"""Bodies on the wire: JSON by default, msgpack on request; raw bytes and text pass through."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgpack
from pydantic import BaseModel, TypeAdapter
from pydantic_core import SchemaValidator, to_json, to_jsonable_python

JSON = "application/json"
MSGPACK = "application/msgpack"
CONTENT_TYPES = {"json": JSON, "msgpack": MSGPACK}
# The names msgpack goes by; anything else (or no Content-Type at all) is JSON.
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})


def media_type(content_type: str | None) -> str:
    """The ``type/subtype`` of a Content-Type value, lower-cased, without its parameters."""
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def is_msgpack(content_type: str | None) -> bool:
    """Whether a body with this Content-Type is msgpack (media types compare case-insensitively)."""
    return media_type(content_type) in MSGPACK_TYPES


class InputDecoder:
    """Decodes a body into a handler's declared input type.

    ``bytes`` gets the raw body, ``str`` the UTF-8 text; anything else (a pydantic model, ``dict``,
    a plain annotation) is decoded from JSON or msgpack and validated by pydantic.
    """

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation
        self.raw = annotation is bytes
        self.text = annotation is str
        self._adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        # The adapter's own validate_json only passes its defaults on to this: called directly,
        # once per invocation, it saves a call. (Kept as it is when plugins wrap the validator.)
        validator = self._adapter.validator
        self._validate_json: Callable[[bytes], Any] = (
            validator.validate_json if isinstance(validator, SchemaValidator) else self._adapter.validate_json)

    def decode(self, data: bytes, content_type: str | None) -> Any:
        if self.raw:
            return data
        if self.text:
            return data.decode("utf-8")
        if is_msgpack(content_type):
            return self._adapter.validate_python(msgpack.unpackb(data, raw=False))
        return self._validate_json(data if data else b"null")


def encode(value: Any, encoding: str = "json") -> bytes:
    """Encode a handler's return value (or a client payload) for the wire."""
    if value is None and encoding == "json":   # what most handlers that only do something return
        return b"null"
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if encoding == "msgpack":
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return msgpack.packb(to_jsonable_python(value), use_bin_type=True)  # type: ignore[no-any-return]
    if isinstance(value, str):
        return json.dumps(value).encode()
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()   # NaN follows the model's ser_json_inf_nan (null by default)
    body = to_json(value)
    if b"NaN" in body or b"Infinity" in body:
        _refuse_constants(body)
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (return None, a string, or encode as msgpack)")


def _refuse_constants(body: bytes) -> None:
    """Raise if ``body`` holds NaN or Infinity as values (not inside strings): JSON has neither."""
    json.loads(body, parse_constant=_reject_constant)


def decode(data: bytes, content_type: str | None) -> Any:
    """Decode a body without a target type (client side, CLI)."""
    if is_msgpack(content_type):
        return msgpack.unpackb(data, raw=False)
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data
