"""``runtime deploy | undeploy | ls | rollback``: manage what the fleet serves, without restarts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError

from ..errors import LoadError, ManifestError
from ..exitcodes import RET_OK
from ..loader import load_handler_async
from ..loop import run
from ..manifest import ManifestSet, manifest_files
from ..registry import Registry, Undeployed
from ..status import gather_status
from ..streams import INVOKE_STREAM
from . import common


def register(sub: Any) -> None:
    commands = [
        ("deploy", "validate manifests and deploy them to every running runtime", cmd_deploy,
         ("paths", {"nargs": "+", "metavar": "FILE_OR_DIR",
                    "help": "manifest files, or directories of *.yaml / *.yml manifests"})),
        ("undeploy", "stop serving a function (its queued messages are kept) or remove a schedule", cmd_undeploy,
         ("name", {"metavar": "NAME", "help": "a function or a standalone schedule"})),
        ("ls", "list deployed functions", cmd_ls, None),
        ("rollback", "restore the previous revision of a function or schedule", cmd_rollback,
         ("name", {"metavar": "NAME", "help": "a function or a standalone schedule"})),
    ]
    for name, help_text, func, positional in commands:
        p = sub.add_parser(name, help=help_text)
        if positional is not None:
            p.add_argument(positional[0], **positional[1])
        if name == "undeploy":
            p.add_argument("--force", action="store_true",
                           help="also undeploy the standalone schedules that target the function")
        common.add_server_option(p)
        common.add_json_option(p)
        p.set_defaults(func=func)


def cmd_deploy(args: argparse.Namespace) -> int:
    root = Path.cwd()
    if not manifest_files(args.paths):
        # Deploying nothing is a mistyped path far more often than an intent: say so before connecting.
        raise ManifestError(", ".join(args.paths), [("", "no manifests found (*.yaml or *.yml files)")])

    async def main() -> list[dict[str, Any]]:
        async with common.connection(args) as (_, js):
            registry = await Registry.open(js)
            known = {d.manifest.name for d in (await registry.all()).values() if d.manifest.kind == "Function"}
            manifests = ManifestSet.load(args.paths, known_functions=known)
            for manifest in manifests.functions.values():
                # The same checks a runtime makes; a module that exits at import is one error line
                # that names the manifest, as a bad field would.
                try:
                    await load_handler_async(manifest.handler, root=root)
                except LoadError as exc:
                    source = manifests.sources.get(f"Function:{manifest.name}", manifest.name)
                    raise ManifestError(source, [("handler", str(exc))]) from None
            return [vars(r) for r in await registry.deploy(manifests)]

    results = run(main())
    if args.json:
        common.print_json(results)
    for r in [] if args.json else results:
        detail = f" ({', '.join(r['changed'])})" if r["changed"] else ""
        print(f"{r['kind'].lower()} {r['name']}: {r['status']}{detail} [revision {r['revision']}]")
    return RET_OK


def cmd_undeploy(args: argparse.Namespace) -> int:
    async def main() -> Undeployed:
        async with common.connection(args) as (_, js):
            return await (await Registry.open(js)).undeploy(args.name, force=args.force)

    done = run(main())
    if args.json:
        common.print_json({**vars(done), "status": "undeployed"})
        return RET_OK
    for schedule in done.schedules:
        print(f"schedule {schedule}: undeployed (it targeted {done.name})")
    if done.kind == "Schedule":
        print(f"schedule {done.name}: undeployed (it fires no more; its function stays deployed)")
        return RET_OK
    own = f", with its schedule{'s' * (len(done.own_schedules) > 1)} {', '.join(done.own_schedules)}" \
        if done.own_schedules else ""
    print(f"function {done.name}: undeployed{own} (queued messages are kept until it is deployed again)")
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
        functions = {d.manifest.name for d in deployments.values() if d.manifest.kind == "Function"}
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
                           status=_schedule_status(m.enabled, m.function in functions), failing={})
            rows.append(row)
        return rows


def _schedule_status(enabled: bool, target_deployed: bool) -> str:
    # Runtimes do not run a schedule whose function is not deployed (one left from older versions).
    if not target_deployed:
        return "no function"
    return "enabled" if enabled else "disabled"


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
