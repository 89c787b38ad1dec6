"""The README, run as a newcomer would: its shell commands, its Python snippets, its example file.

The commands are read from the README when the test runs, so a changed README is what is tested.
Every fenced ``sh`` block of the sections in ``SHELL_SECTIONS`` (with their subsections) runs in
README order against the examples served by ``runtime serve`` (embedded server, free port,
temporary store). What the test changes in a command, and nothing else:

- ``.venv/bin/runtime`` and ``runtime`` are this virtualenv's ``runtime``; ``NATS_URL`` points at
  the served runtime, so the commands need no ``--server``;
- ``nats`` is a stand-in for the NATS CLI (a separate install, absent here) that performs the
  same wire operation with nats-py: ``pub``, ``req`` (with ``-H``) and ``micro info|stats|ping``;
  any other ``nats`` command fails the test. Unlike the CLI, it exits 1 on an error reply;
- placeholders are filled: ``<call-id>`` from the output of the last ``--async`` command,
  ``SEQ`` with a dead letter's sequence (one is made first if there is none), ``NAME`` and
  ``FUNCTION`` with a function (``flaky`` for ``dlq`` commands, ``hello`` otherwise), ``REV``
  with 1, ``N`` with 1; an unknown placeholder fails the test;
- ``[optional parts]`` are included; a command with alternatives (``SEQ | --function NAME |
  --all``) runs once per alternative;
- a command refused for want of confirmation (exit 6, no terminal) runs again on a
  pseudo-terminal that answers ``y``.

Each command must exit 0, or the code its comment documents with "exits N". A program other
than ``runtime``, ``nats`` or ``echo`` fails the test with the line.

The examples are served from a copy of ``manifests/`` whose ``hello`` differs only by its
description, so that the README's ``runtime deploy manifests/hello.yaml`` is an update and
``rollback`` has a revision to go back to.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runtime.exitcodes import RET_DECLINED
from runtime.server import free_port

from .conftest import ROOT, RuntimeProcess

README = ROOT / "README.md"
SHELL_SECTIONS = ("Try it", "Calling functions and getting answers", "Deploying without restarts",
                  "Dead letters", "Cron schedules", "Event triggers and fan-out")
PYTHON_SECTIONS = ("Try it", "From Python")
README_URL = "nats://127.0.0.1:4222"
PROGRAMS = ("runtime", ".venv/bin/runtime", "nats", "echo")
COMMAND_TIMEOUT = 60.0
_PUNCTUATION = frozenset({"|", "||", "&&", ";", "&"})
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
_ANGLE = re.compile(r"<([a-z][a-z-]*)>")
_EXITS = re.compile(r"\bexits (\d+)\b")

NATS_STAND_IN = '''\
"""Stands in for the NATS CLI: the same wire operation with nats-py."""
import asyncio
import os
import sys

import nats


def parse(argv):
    positional, headers, args = [], {}, iter(argv)
    for arg in args:
        if arg in ("-H", "--header"):
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg.startswith("-"):
            raise SystemExit(f"nats stand-in: option {arg} not translated")
        else:
            positional.append(arg)
    return positional, headers or None


async def main(argv):
    words, headers = parse(argv)
    nc = await nats.connect(os.environ["NATS_URL"])
    try:
        if len(words) == 3 and words[0] == "pub":
            await nc.publish(words[1], words[2].encode(), headers=headers)
            await nc.flush()
            print(f"Published {len(words[2])} bytes to {words[1]!r}")
            return 0
        if len(words) == 3 and words[0] == "req":
            reply = await nc.request(words[1], words[2].encode(), timeout=10, headers=headers)
        elif len(words) == 3 and words[:2] in (["micro", "info"], ["micro", "stats"], ["micro", "ping"]):
            reply = await nc.request(f"$SRV.{words[1].upper()}.{words[2]}", b"", timeout=10)
        else:
            print("nats stand-in: not translated: nats " + " ".join(argv), file=sys.stderr)
            return 127
        for name, value in (reply.headers or {}).items():
            print(f"{name}: {value}")
        print(reply.data.decode())
        return 1 if (reply.headers or {}).get("Nats-Service-Error-Code") else 0
    finally:
        await nc.close()


sys.exit(asyncio.run(main(sys.argv[1:])))
'''


# ------------------------------------------------------------------ reading the README


def section(text: str, title: str) -> str:
    """The lines of the section headed ``title``, with its subsections (headings in code blocks are not headings)."""
    lines, inside, level, fenced = [], False, 0, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"(#+) (.*)", line) if not fenced else None
        if heading and inside and len(heading.group(1)) <= level:
            break
        if heading and not inside and heading.group(2).strip() == title:
            inside, level = True, len(heading.group(1))
        if inside:
            lines.append(line)
    assert inside, f"the README has no section {title!r}"
    return "\n".join(lines)


def blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of ``language`` in ``text``."""
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S)]


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing comment (a ``#`` outside quotes that starts a word)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def shell_lines(block: str) -> Iterator[tuple[str, str]]:
    """(code, comment) of each command of a block, continuation lines joined."""
    pending = ""
    for raw in block.splitlines():
        raw = raw.strip() if pending else raw
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1].rstrip() + " "
            continue
        code, comment = split_comment(pending + raw)
        pending = ""
        if code.strip():
            yield code.strip(), comment


def tokens(code: str) -> list[str]:
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def alternatives(code: str) -> list[list[str]]:
    """One token list per form: ``cmd A | --b X | --c`` is three forms; a real pipe stays one."""
    words = tokens(code)
    pieces: list[list[str]] = [[]]
    for word in words:
        if word == "|":
            pieces.append([])
        else:
            pieces[-1].append(word)
    if len(pieces) == 1 or not all(piece and piece[0].startswith("-") for piece in pieces[1:]):
        return [words]
    first = pieces[0]
    cut = len(first)
    while cut > 1 and (_PLACEHOLDER.fullmatch(first[cut - 1]) or first[cut - 1].startswith("-")):
        cut -= 1
    return [first] + [first[:cut] + piece for piece in pieces[1:]]


def optional_parts_included(words: list[str]) -> list[str]:
    out: list[str] = []
    inside = False
    for word in words:
        if re.match(r"\[(-|[A-Z])", word):
            inside, word = True, word[1:]
        if inside and word.endswith("]"):
            inside, word = False, word[:-1]
        out.append(word)
    return out


# ------------------------------------------------------------------ running commands


@dataclass
class Ran:
    command: str
    code: int
    stdout: str
    stderr: str


@dataclass
class Walkthrough:
    """Runs README commands one after the other, remembering what later commands refer to."""

    url: str
    bin_dir: Path
    log: list[Ran] = field(default_factory=list)
    call_id: str | None = None

    @property
    def runtime(self) -> str:
        return str(Path(sys.executable).parent / "runtime")

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, "NATS_URL": self.url, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}

    def shell(self, command: str, *, terminal: bool = False) -> Ran:
        if terminal:
            ran = self._on_terminal(command)
        else:
            done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            ran = Ran(command, done.returncode, done.stdout, done.stderr)
        self.log.append(ran)
        return ran

    def _on_terminal(self, command: str) -> Ran:
        """Run with stdin and stderr on a pseudo-terminal that answers ``y``."""
        master, slave = os.openpty()
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=self.env, stdin=slave, stderr=slave,
                                stdout=subprocess.PIPE, start_new_session=True)
        os.close(slave)
        os.write(master, b"y\n")
        seen = b""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.1)
                if ready:
                    try:
                        seen += os.read(master, 4096)
                    except OSError:   # the terminal closed with the process
                        break
            stdout = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
        return Ran(command, proc.returncode, stdout.decode(errors="replace"), seen.decode(errors="replace"))

    def runtime_json(self, *args: str) -> object:
        ran = self.shell(shlex.join([self.runtime, *args, "--json"]))
        assert ran.code == 0, self.explain(ran)
        return json.loads(ran.stdout)

    def dead_letter(self) -> int:
        """The sequence of a dead letter, after making one if there is none."""
        letters = self.runtime_json("dlq", "ls")
        if not letters:
            made = self.shell(shlex.join([self.runtime, "invoke", "flaky", '{"reject": true}']))
            assert made.code == 3, self.explain(made)
            deadline = time.monotonic() + 10
            while not letters and time.monotonic() < deadline:
                time.sleep(0.1)
                letters = self.runtime_json("dlq", "ls")
        assert isinstance(letters, list) and letters, "no dead letter appeared for a SEQ placeholder"
        return int(letters[0]["seq"])

    def fill(self, words: list[str], line: str) -> list[str]:
        out: list[str] = []
        for word in words:
            if word in (".venv/bin/runtime", "runtime") and (not out or out[-1] in _PUNCTUATION):
                word = self.runtime
            elif _PLACEHOLDER.fullmatch(word):
                word = self.placeholder(word, words, line)
            out.append(word)
        return out

    def placeholder(self, word: str, words: list[str], line: str) -> str:
        if word == "SEQ":
            return str(self.dead_letter())
        if word in ("NAME", "FUNCTION"):
            return "flaky" if "dlq" in words else "hello"
        if word in ("REV", "N"):
            return "1"
        raise AssertionError(f"README command with a placeholder this test cannot fill ({word}): {line}")

    def check_programs(self, words: list[str], line: str) -> None:
        starts = [w for i, w in enumerate(words) if i == 0 or words[i - 1] in _PUNCTUATION]
        unknown = [w for w in starts if w not in PROGRAMS]
        assert not unknown, f"README command this test does not know how to run ({unknown[0]}): {line}"

    def run_line(self, code: str, comment: str) -> None:
        line = f"{code}  # {comment}" if comment else code
        if self.call_id is not None:
            code = code.replace("<call-id>", self.call_id)
        leftover = _ANGLE.search(code)
        assert leftover is None, f"README command with a placeholder this test cannot fill ({leftover[0]}): {line}"
        documented = _EXITS.search(comment)
        expected = int(documented[1]) if documented else 0
        for form in alternatives(code):
            words = optional_parts_included(form)
            self.check_programs(words, line)
            command = " ".join(w if w in _PUNCTUATION else shlex.quote(w) for w in self.fill(words, line))
            ran = self.shell(command)
            if ran.code == RET_DECLINED and "--yes" not in words:
                ran = self.shell(command, terminal=True)
            assert ran.code == expected, f"README line: {line}\n{self.explain(ran)}"
            if "--async" in words:
                self.call_id = ran.stdout.strip()

    @staticmethod
    def explain(ran: Ran) -> str:
        return f"ran: {ran.command}\nexit {ran.code}\nstdout: {ran.stdout}\nstderr: {ran.stderr}"


# ------------------------------------------------------------------ the served examples


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The examples served by ``runtime serve`` on an embedded server; yields its URL."""
    manifests = tmp_path / "manifests"
    shutil.copytree(ROOT / "manifests", manifests)
    hello = manifests / "hello.yaml"
    original = hello.read_text()
    changed = re.sub(r"(?m)^description: .*$", "description: Greets someone (the previous revision)", original)
    assert changed != original, "manifests/hello.yaml has no description line to vary"
    hello.write_text(changed)
    port = free_port()
    proc = RuntimeProcess(None, manifests, tmp_path / "serve.log", ["--port", str(port), "--data-dir",
                                                                     str(tmp_path / "data"), "--grace", "2s"])
    try:
        deadline = time.monotonic() + 30
        while "runtime ready" not in proc.output():
            assert proc.proc.poll() is None, f"runtime serve exited:\n{proc.output()}"
            assert time.monotonic() < deadline, f"runtime serve not ready:\n{proc.output()}"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
def walkthrough(served: str, tmp_path: Path) -> Walkthrough:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nats_cli = bin_dir / "nats"
    nats_cli.write_text(f"#!{sys.executable}\n{NATS_STAND_IN}")
    nats_cli.chmod(0o755)
    return Walkthrough(served, bin_dir)


# ------------------------------------------------------------------ the tests


def test_readme_shell_commands_run_as_documented(walkthrough: Walkthrough) -> None:
    text = README.read_text()
    count = 0
    for title in SHELL_SECTIONS:
        for block in blocks(section(text, title), "sh"):
            for code, comment in shell_lines(block):
                walkthrough.run_line(code, comment)
                count += 1
    assert count >= 10, f"only {count} README commands found in {SHELL_SECTIONS}"


def test_readme_python_snippets_run(served: str) -> None:
    text = README.read_text()
    snippets = [block for title in PYTHON_SECTIONS for block in blocks(section(text, title), "python")]
    assert snippets, f"no Python snippets in {PYTHON_SECTIONS}"
    for snippet in snippets:
        assert README_URL in snippet, f"a README snippet that does not use {README_URL}:\n{snippet}"
        done = subprocess.run([sys.executable, "-c", snippet.replace(README_URL, served)], cwd=ROOT,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        assert done.returncode == 0, f"{snippet}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        # What a print's comment says it shows is what it shows.
        for shown in re.findall(r"^\s*print\(.*\)\s+# (.*)$", snippet, re.M):
            assert shown.strip() in done.stdout.splitlines(), f"{snippet}\nprinted: {done.stdout}"


def test_readme_hello_matches_the_shipped_file() -> None:
    """The README's ``functions/hello.py`` is the shipped file; only its ``# functions/hello.py`` line is added."""
    marker = "# functions/hello.py\n"
    [shown] = [block for block in blocks(README.read_text(), "python") if block.startswith(marker)]
    assert shown.removeprefix(marker) == (ROOT / "functions" / "hello.py").read_text()


def test_the_readme_reader_understands_what_the_readme_writes() -> None:
    assert alternatives("runtime dlq replay SEQ | --function NAME | --all") == [
        ["runtime", "dlq", "replay", "SEQ"], ["runtime", "dlq", "replay", "--function", "NAME"],
        ["runtime", "dlq", "replay", "--all"]]
    assert alternatives("echo '{\"a\": [1]}' | runtime invoke a -") == [
        ["echo", '{"a": [1]}', "|", "runtime", "invoke", "a", "-"]]
    assert optional_parts_included(["runtime", "dlq", "ls", "[--function", "NAME]", "[--json]"]) == [
        "runtime", "dlq", "ls", "--function", "NAME", "--json"]
    assert split_comment("nats pub a '{\"b\": \"#c\"}'   # d # e") == ("nats pub a '{\"b\": \"#c\"}'", "d # e")
    assert list(shell_lines("a \\\n  b  # c\n\n# only a comment\n")) == [("a b", "c")]
    with pytest.raises(AssertionError, match="does not know how to run \\(curl\\): curl x"):
        Walkthrough("nats://x", Path()).check_programs(["curl", "x"], "curl x")


def test_a_command_on_the_pseudo_terminal_is_answered_yes(tmp_path: Path) -> None:
    ran = Walkthrough("nats://x", tmp_path)._on_terminal('[ -t 0 ] && [ -t 2 ] && read answer && echo "$answer"')
    assert (ran.code, ran.stdout) == (0, "y\n")
