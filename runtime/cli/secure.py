"""``runtime secure init DIR``: a CA, certificates, passwords and the roles' nats.conf, in one directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..exitcodes import RET_OK
from ..roles import User

DEFAULT_URL = "tls://127.0.0.1:4222"


def _caller(value: str) -> User:
    name, sep, functions = value.partition("=")
    try:
        return User(name.strip(), "caller", tuple(f.strip() for f in functions.split(",") if f.strip()) if sep else ())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("secure", help="generate credentials and TLS for the roles")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="write a CA, certificates, passwords and nats.conf into DIR "
                                           "(existing files are kept)")
    init.add_argument("directory", metavar="DIR", help="where to write them (created with mode 0700)")
    init.add_argument("--caller", action="append", type=_caller, default=[], metavar="NAME=FUNCTION,...",
                      help="a caller and the functions it may invoke (repeatable; default: caller=hello)")
    init.add_argument("--url", default=DEFAULT_URL, help=f"the server URL to show in the examples ({DEFAULT_URL})")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    # Imported here: cryptography takes ~7 MB that a runtime that only serves never needs.
    from ..secure import generate, usage

    callers: list[User] = args.caller or [User("caller", "caller", ("hello",))]
    users = [User("runtime", "runtime"), User("deployer", "deployer"), *callers]
    layout = generate(Path(args.directory), users)
    print(f"wrote {layout.conf} and the CA, certificates and passwords beside it "
          "(keys and passwords readable by you only)\n")
    print(usage(layout, args.url), end="")
    return RET_OK
