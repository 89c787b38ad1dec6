"""pytest fixtures for function authors, registered by the package's ``pytest11`` entry point.

- ``fn_call``: :func:`runtime.testing.call` with paths relative to the project's root directory;
  ``await fn_call.acall(...)`` is its async form.
- ``fn_serve``: a nats-server and a runtime serving the project's manifests, for one test; the
  fixture's value is a connected :class:`~runtime.Client`. The ``fn_manifests`` ini option says
  what to serve (default: ``manifests``); ``@pytest.mark.fn_serve("manifests/hello.yaml",
  grace=1)`` changes it, and the runtime's settings, for one test. Needs pytest-asyncio.

Loaded by every pytest run in the environment, so the server and runtime machinery
(:mod:`runtime.testing`) is imported only when a fixture is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

try:
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pytest then says that no plugin handles the async fixture fn_serve
    async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:
    from .testing import Outcome, ServedClient, Target

MANIFESTS_INI = "fn_manifests"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(MANIFESTS_INI, "manifest files or directories fn_serve serves, relative to the root directory",
                  type="args", default=["manifests"])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fn_serve(*manifests, **settings): what the fn_serve fixture serves "
                                       "in this test, and the runtime's settings")


class Caller:
    """Runs one attempt of a function in-process; relative paths start at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, target: Target, payload: Any = None, **options: Any) -> Outcome:
        from .testing import call

        return call(target, payload, **{"root": self.root, **options})

    async def acall(self, target: Target, payload: Any = None, **options: Any) -> Outcome:
        from .testing import acall

        return await acall(target, payload, **{"root": self.root, **options})


@pytest.fixture
def fn_call(request: pytest.FixtureRequest) -> Caller:
    """``fn_call("manifests/hello.yaml", {"name": "Ada"}).result``: one attempt, no server."""
    return Caller(request.config.rootpath)


@async_fixture
async def fn_serve(request: pytest.FixtureRequest) -> AsyncIterator[ServedClient]:
    """A client of a runtime serving the project's manifests on a server of its own."""
    from .testing import serve

    root = request.config.rootpath
    marker = request.node.get_closest_marker("fn_serve")
    paths = list(marker.args) if marker and marker.args else request.config.getini(MANIFESTS_INI)
    settings = {"project_root": root, **(marker.kwargs if marker else {})}
    async with serve([root / path for path in paths], **settings) as client:
        yield client
