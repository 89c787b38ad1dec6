"""``runtime deploy | undeploy | ls | rollback``: manage what the fleet serves, without restarts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError

from ..exitcodes import RET_OK
from ..loader import load_handler_async
from ..loop import run
from ..manifest import ManifestSet
from ..registry import Registry
from ..status import gather_status
from ..streams import INVOKE_STREAM
from . import common


def register(sub: Any) -> None:
    commands = [
        ("deploy", "validate manifests and deploy them to every running runtime", cmd_deploy,
         ("paths", {"nargs": "+", "metavar": "FILE_OR_DIR"})),
        ("undeploy", "stop serving a function (its queued messages are kept)", cmd_undeploy, ("name", {})),
        ("ls", "list deployed functions", cmd_ls, None),
        ("rollback", "restore the previous revision of a function or schedule", cmd_rollback, ("name", {})),
    ]
    for name, help_text, func, positional in commands:
        p = sub.add_parser(name, help=help_text)
        if positional is not None:
            p.add_argument(positional[0], **positional[1])
        common.add_server_option(p)
        common.add_json_option(p)
        p.set_defaults(func=func)


def cmd_deploy(args: argparse.Namespace) -> int:
    root = Path.cwd()

    async def main() -> list[dict[str, Any]]:
        async with common.connection(args) as (_, js):
            registry = await Registry.open(js)
            known = {d.manifest.name for d in (await registry.all()).values() if d.manifest.kind == "Function"}
            manifests = ManifestSet.load(args.paths, known_functions=known)
            for manifest in manifests.functions.values():
                # The same checks a runtime makes; a module that exits at import is one error line.
                await load_handler_async(manifest.handler, root=root)
            return [vars(r) for r in await registry.deploy(manifests)]

    results = run(main())
    if args.json:
        common.print_json(results)
    for r in [] if args.json else results:
        detail = f" ({', '.join(r['changed'])})" if r["changed"] else ""
        print(f"{r['kind'].lower()} {r['name']}: {r['status']}{detail} [revision {r['revision']}]")
    return RET_OK


def cmd_undeploy(args: argparse.Namespace) -> int:
    async def main() -> str:
        async with common.connection(args) as (_, js):
            return await (await Registry.open(js)).undeploy(args.name)

    key = run(main())
    if args.json:
        common.print_json({"name": args.name, "key": key, "status": "undeployed"})
    else:
        print(f"{args.name}: undeployed (queued messages are kept until it is deployed again)")
    return RET_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        async with common.connection(args) as (_, js):
            return vars(await (await Registry.open(js)).rollback(args.name))

    result = run(main())
    if args.json:
        common.print_json(result)
    else:
        detail = f" ({', '.join(result['changed'])})" if result["changed"] else ""
        print(f"{result['name']}: rolled back{detail} [revision {result['revision']}]")
    return RET_OK


async def _listing(args: argparse.Namespace) -> list[dict[str, Any]]:
    async with common.connection(args) as (nc, js):
        deployments = await (await Registry.open(js)).all()
        statuses = await gather_status(nc)
        rows = []
        for dep in sorted(deployments.values(), key=lambda d: (d.manifest.kind, d.manifest.name)):
            m = dep.manifest
            row: dict[str, Any] = {"name": m.name, "kind": m.kind, "revision": dep.revision,
                                   "deployed_at": dep.deployed_at}
            if m.kind == "Function":
                try:
                    info = await js.consumer_info(INVOKE_STREAM, m.name)
                    queued, in_flight = info.num_pending, info.num_ack_pending
                except NotFoundError:
                    queued = in_flight = 0
                failing = {s["runtime"]: s["failing"][m.name] for s in statuses if m.name in s.get("failing", {})}
                serving = [s["runtime"] for s in statuses if m.name in s.get("serving", {})]
                row.update(settings=(f"concurrency={m.concurrency} timeout={m.timeout:g}s "
                                     f"max_deliver={m.retry.max_deliver}"),
                           queued=queued, in_flight=in_flight, runtimes=len(serving),
                           status="failing" if failing else ("serving" if serving else "idle"), failing=failing)
            else:
                row.update(settings=f"cron={m.cron!r} -> {m.function}", queued="", in_flight="", runtimes="",
                           status="enabled" if m.enabled else "disabled", failing={})
            rows.append(row)
        return rows


def cmd_ls(args: argparse.Namespace) -> int:
    rows = run(_listing(args))
    if args.json:
        common.print_json(rows)
        return RET_OK
    common.print_table(["name", "kind", "rev", "deployed at", "status", "runtimes", "queued", "in flight", "settings"],
                       [[r["name"], r["kind"].lower(), r["revision"], r["deployed_at"], r["status"], r["runtimes"],
                         r["queued"], r["in_flight"], r["settings"]] for r in rows])
    for r in rows:
        for runtime, error in r["failing"].items():
            print(f"  {r['name']} failing on {runtime}: {error}")
    return RET_OK
