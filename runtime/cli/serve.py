"""``runtime serve``: serve functions, on the embedded server unless a URL is given."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from ..app import serve as serve_forever
from ..errors import ConfigError
from ..exitcodes import RET_OK
from ..loader import load_handler
from ..logs import LEVELS, configure
from ..loop import run
from ..manifest import ManifestSet
from ..settings import Settings


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="serve functions (embedded NATS by default)")
    p.add_argument("--manifests", "-m", action="append", default=[], metavar="PATH",
                   help="manifest file or directory to deploy at start (repeatable)")
    p.add_argument("--server", "-s", metavar="URL", default=None,
                   help="connect to this NATS server or cluster instead of starting one ($NATS_URL)")
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
    p.add_argument("--reply-prefix", action="append", default=[], metavar="PREFIX",
                   help="answer callers only on reply subjects starting with PREFIX, e.g. _INBOX. (repeatable; "
                        "$RUNTIME_REPLY_PREFIX, comma-separated); subjects starting with $ are never answered")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                   help="how much to log (case-insensitive; default $RUNTIME_LOG_LEVEL or INFO)")
    p.set_defaults(func=cmd_serve)


def check_handlers(manifests: ManifestSet, root: Path) -> None:
    """Import every handler before anything starts, so a broken one fails the command (one line)."""
    for manifest in manifests.functions.values():
        load_handler(manifest.handler, root=root)


def log_level(given: str | None) -> str:
    """``--log-level``, else ``$RUNTIME_LOG_LEVEL`` (checked like the option), else INFO."""
    if given:
        return given
    level = os.environ.get("RUNTIME_LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LEVELS:
        raise ConfigError(f"RUNTIME_LOG_LEVEL={os.environ['RUNTIME_LOG_LEVEL']!r} is not a log level "
                          f"(choose from {', '.join(LEVELS)})")
    return level


def cmd_serve(args: argparse.Namespace) -> int:
    configure("DEBUG" if args.debug else log_level(args.log_level))
    settings = Settings.from_env(server=args.server, host=args.host, port=args.port, data_dir=args.data_dir,
                                 nats_conf=args.nats_conf, grace=args.grace,
                                 dlq_retention=args.dlq_retention, results_ttl=args.results_ttl,
                                 max_queued=args.max_queued,
                                 manifests=tuple(Path(p) for p in args.manifests),
                                 reply_prefixes=tuple(args.reply_prefix) or None)
    check_handlers(ManifestSet.load(settings.manifests), settings.project_root)

    async def main() -> None:
        await serve_forever(settings, asyncio.Event())

    run(main())
    return RET_OK
