"""``runtime serve``: serve functions, on the embedded server unless a URL is given."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..app import serve as serve_forever
from ..errors import ConfigError
from ..exitcodes import RET_OK
from ..loader import load_handler
from ..logs import FORMATS, LEVELS, configure
from ..loop import run
from ..manifest import ManifestSet
from ..settings import Settings
from ..trust import combine, env_prefixes, parse_prefixes
from . import common


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="serve functions (embedded NATS by default)")
    p.add_argument("--manifests", "-m", action="append", default=[], metavar="PATH",
                   help="manifest file or directory to deploy at start (repeatable)")
    p.add_argument("--server", "-s", metavar="URL", default=None,
                   help="connect to this NATS server instead of starting one, or to a cluster: its servers "
                        "separated by commas ($NATS_URL)")
    common.add_auth_options(p)
    p.add_argument("--host", default=None, metavar="ADDRESS",
                   help="listen address of the embedded server (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None, help="port of the embedded server (default 4222)")
    p.add_argument("--data-dir", default=None, help="embedded server storage (default ./.runtime)")
    p.add_argument("--nats-conf", default=None, help="embedded server config (default ./nats.conf)")
    p.add_argument("--grace", default=None, help="how long in-flight work may finish on shutdown (30s)")
    p.add_argument("--dlq-retention", default=None, metavar="DURATION",
                   help="how long dead letters are kept, e.g. 7d (default 30d)")
    p.add_argument("--results-ttl", default=None, metavar="DURATION",
                   help="how long final outcomes are kept in fn_results (default 24h)")
    p.add_argument("--max-queued", type=int, default=None, metavar="N",
                   help="refuse new invocations of a function (per priority level) while N are stored "
                        "($RUNTIME_MAX_QUEUED; default: no limit; give every runtime of a fleet the same)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="copies of every stream and bucket the runtime owns: 3 on a three-node cluster, so that "
                        "losing a node loses nothing acknowledged ($RUNTIME_REPLICAS; default 1; existing streams "
                        "are scaled to N in place)")
    p.add_argument("--reply-prefix", action="append", default=[], metavar="PREFIX",
                   help="answer callers only on reply subjects starting with PREFIX, e.g. _INBOX. (repeatable; "
                        "$RUNTIME_REPLY_PREFIX, comma-separated); subjects starting with $ are never answered")
    p.add_argument("--trust", action="append", default=[], metavar="PREFIX",
                   help="also import handlers under this module prefix, e.g. myapp or myapp.handlers (repeatable; "
                        "$RUNTIME_TRUST, comma-separated); functions and the packages of --manifests are always "
                        "trusted, and a deployed handler outside them is refused")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="serve /healthz, /readyz and /metrics on this address, or off ($RUNTIME_HTTP; default "
                        "127.0.0.1:9090 with the embedded server, skipped if that port is taken; off with --server)")
    p.add_argument("--http-token", default=None, metavar="TOKEN",
                   help="require Authorization: Bearer TOKEN on the HTTP listener, except /healthz, /readyz and "
                        "/metrics ($RUNTIME_HTTP_TOKEN, preferred: a flag shows in the process list; default: none)")
    p.add_argument("--http-max-body", type=int, default=None, metavar="BYTES",
                   help="largest HTTP request body, 413 beyond ($RUNTIME_HTTP_MAX_BODY; default 1048576)")
    p.add_argument("--secure", action="store_true",
                   help="start the embedded server with TLS on loopback and the users runtime, deployer and caller "
                        "(credentials generated once under <data-dir>/secure); prints how to connect")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                   help="how much to log (case-insensitive; default $RUNTIME_LOG_LEVEL or INFO)")
    p.add_argument("--log-format", type=str.lower, choices=FORMATS, default=None,
                   help="text for people, json for one object per line (default $RUNTIME_LOG_FORMAT or text)")
    p.set_defaults(func=cmd_serve)


def check_handlers(manifests: ManifestSet, root: Path) -> None:
    """Import every handler before anything starts, so a broken one fails the command (one line)."""
    for manifest in manifests.functions.values():
        load_handler(manifest.handler, root=root)


def log_level(given: str | None) -> str:
    """``--log-level``, else ``$RUNTIME_LOG_LEVEL`` (checked like the option), else INFO."""
    return _option_or_env(given, "RUNTIME_LOG_LEVEL", LEVELS, "INFO", "a log level", str.upper)


def log_format(given: str | None) -> str:
    """``--log-format``, else ``$RUNTIME_LOG_FORMAT`` (checked like the option), else text."""
    return _option_or_env(given, "RUNTIME_LOG_FORMAT", FORMATS, "text", "a log format", str.lower)


def _option_or_env(given: str | None, variable: str, choices: Sequence[str], default: str, what: str,
                   normal: Callable[[str], str]) -> str:
    if given:
        return given
    value = normal(os.environ.get(variable, "").strip()) or default
    if value not in choices:
        raise ConfigError(f"{variable}={os.environ[variable]!r} is not {what} (choose from {', '.join(choices)})")
    return value


def serve_secure(settings: Settings) -> int:
    """``--secure``: the embedded server with the roles and TLS, the runtime connected as ``runtime``."""
    from ..secure import prepare, usage
    from ..secure import serve_secure as serve_with_roles

    if settings.server is not None:
        raise ConfigError("--secure starts the embedded server; it cannot be used with --server or NATS_URL")
    settings, layout, url = prepare(settings)
    print(f"Secure embedded server on {url}; credentials and certificates in {layout.directory}\n\n"
          f"{usage(layout, url, start_server=False)}", flush=True)
    run(serve_with_roles(settings, asyncio.Event()))
    return RET_OK


def cmd_serve(args: argparse.Namespace) -> int:
    configure("DEBUG" if args.debug else log_level(args.log_level), log_format(args.log_format))
    settings = Settings.from_env(server=args.server, host=args.host, port=args.port, data_dir=args.data_dir,
                                 nats_conf=args.nats_conf, grace=args.grace,
                                 dlq_retention=args.dlq_retention, results_ttl=args.results_ttl,
                                 max_queued=args.max_queued, http=args.http, replicas=args.replicas,
                                 http_token=args.http_token, http_max_body=args.http_max_body,
                                 # Flags add to $RUNTIME_TRUST rather than replace it.
                                 trust=combine(env_prefixes(), parse_prefixes(args.trust)) or None,
                                 manifests=tuple(Path(p) for p in args.manifests),
                                 reply_prefixes=tuple(args.reply_prefix) or None,
                                 connect=common.connect_options(args))
    check_handlers(ManifestSet.load(settings.manifests), settings.project_root)
    if getattr(args, "secure", False):
        return serve_secure(settings)

    async def main() -> None:
        await serve_forever(settings, asyncio.Event())

    run(main())
    return RET_OK
