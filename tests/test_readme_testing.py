"""The README's "Testing your functions" examples run as written, as a user's test files would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def readme_test_files() -> dict[str, str]:
    """Each ```python block of the section that starts with ``# tests/<file>.py``, by file name."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Testing your functions"):]
    section = section[:section.index("\n## ", 1)]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        first, _, _ = block.partition("\n")
        if first.startswith("# tests/"):
            files[first.removeprefix("# tests/").strip()] = block
    return files


def test_the_readme_testing_examples_pass_under_pytest(tmp_path: Path) -> None:
    files = readme_test_files()
    assert set(files) == {"test_hello.py", "test_served.py", "test_fixtures.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    tests = sum(len(re.findall(r"^(?:async )?def test_", code, re.M)) for code in files.values())
    # From the project's root with its pytest settings, as its own tests run; the fixtures come
    # from the installed package's pytest11 entry point, not from this suite's conftest.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(ROOT), *sorted(str(tmp_path / name) for name in files)],
        cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tests} passed" in result.stdout, result.stdout
