"""Untrusted documents (manifest files, registry entries) parsed with bounded cost.

A manifest is a short file, but YAML aliases can make twenty lines expand to billions of nodes
("billion laughs") once anything walks the result, and deep nesting exhausts Python's stack.
Both are refused here, before the data reaches validation, with a ManifestError naming the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import ManifestError

MAX_FILE_BYTES = 256 * 1024
MAX_NODES = 10_000
MAX_TEXT = 1024 * 1024           # characters of scalar text after alias expansion
MAX_DEPTH = 64
MAX_ENTRY_BYTES = 1024 * 1024    # a registry entry (JSON) read back from the server


def short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: error lines quote what they refuse, which may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Refused(Exception):
    """A document too large or too deep to expand safely; the message says which."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing to compose documents nested deeper than ``MAX_DEPTH``.

    The composer recurses once per level, so depth is bounded before Python's own limit is hit.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_expansion(root: yaml.Node, aliases: int) -> None:
    """Refuse a node graph whose expansion (every alias replaced by its anchor) is too large.

    Aliases make the graph a DAG; sizes are memoised per node, so this costs one visit per
    distinct node however large the expansion would be.
    """
    through = " through YAML aliases" if aliases else ""
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (nodes, text, height)
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        if depth > MAX_DEPTH:
            raise _Refused(f"nests deeper than {MAX_DEPTH} levels{through}")
        key = id(node)
        known = sizes.get(key)
        if known is None:
            if key in active:
                raise _Refused("refers to itself through YAML aliases")
            active.add(key)
            nodes, text, height = 1, 0, 0
            if isinstance(node, yaml.ScalarNode):
                text = len(node.value)
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else \
                    [child for pair in node.value for child in pair]
                for child in children:
                    n, t, h = size(child, depth + 1)
                    nodes, text, height = nodes + n, text + t, max(height, h + 1)
                    if nodes > MAX_NODES:
                        raise _Refused(f"expands to more than {MAX_NODES} nodes{through}")
                    if text > MAX_TEXT:
                        raise _Refused(f"expands to more than {MAX_TEXT:,} characters of text{through}")
            active.discard(key)
            known = sizes[key] = (nodes, text, height)
        if depth + known[2] > MAX_DEPTH:
            raise _Refused(f"nests deeper than {MAX_DEPTH} levels{through}")
        return known

    size(root, 1)


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely: plain data only, bounded in size, depth and expansion."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, loader.aliases)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ManifestError(source, [("", str(exc))]) from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of 5,000 digits
        raise ManifestError(source, [("", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()


def load_json_object(data: bytes, source: str) -> dict[str, Any]:
    """Parse a JSON object read from the network (a registry entry), bounded in size and depth."""
    if len(data) > MAX_ENTRY_BYTES:
        raise ManifestError(source, [("", f"is {len(data)} bytes; at most {MAX_ENTRY_BYTES} are allowed")])
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # json recurses once per level of nesting
        raise ManifestError(source, [("", f"invalid JSON: {short(exc, 200)}")]) from None
    if not isinstance(value, dict):
        raise ManifestError(source, [("", f"expected a JSON object, not {type(value).__name__}")])
    return value


def read_yaml_file(path: Path) -> Any:
    """Read one YAML file of at most ``MAX_FILE_BYTES`` and parse it with ``load_yaml``."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # never more, whatever the file is (or claims to be)
    except OSError as exc:
        raise ManifestError(str(path), [("", f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ManifestError(str(path), [("", f"is larger than {MAX_FILE_BYTES // 1024} KiB; "
                                             "a manifest is a short YAML file")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(str(path), [("", f"is not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    return load_yaml(text, str(path))
