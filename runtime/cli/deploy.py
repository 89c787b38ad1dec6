"""``runtime deploy | undeploy | ls | rollback``: manage what the fleet serves, without restarts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import queue, trust
from ..delay import delayed_count
from ..errors import ConfigError, LoadError, ManifestError
from ..exitcodes import RET_ERROR, RET_NOT_FOUND, RET_OK
from ..loader import load_handler_async
from ..loop import run
from ..manifest import FunctionManifest, ManifestSet, ScheduleManifest, TriggerManifest, manifest_files
from ..priority import split_subject
from ..registry import SCHEDULE_PREFIX, Registry, Undeployed, as_manifest_set
from ..revisions import HISTORY, NotDeployed, RegistryError
from ..status import gather_status
from ..streams import INVOKE_STREAM, MAX_REPLICAS
from . import common
from .triggers import TriggerRow, trigger_rows


def register(sub: Any) -> None:
    commands = [
        ("deploy", "validate manifests and deploy them to every running runtime", cmd_deploy,
         ("paths", {"nargs": "+", "metavar": "FILE_OR_DIR",
                    "help": "manifest files, or directories of *.yaml / *.yml manifests"})),
        ("undeploy", "stop serving a function (its queued messages are kept) or remove a schedule", cmd_undeploy,
         ("name", {"metavar": "NAME", "help": "a function or a standalone schedule"})),
        ("ls", "list deployed functions", cmd_ls, None),
        ("history", f"list the revisions of a function or schedule (its last {HISTORY} changes)", cmd_history,
         ("name", {"metavar": "NAME", "help": "a function or a standalone schedule"})),
        ("rollback", "restore an earlier revision of a function or schedule (as a new revision)", cmd_rollback,
         ("name", {"metavar": "NAME", "help": "a function or a standalone schedule"})),
    ]
    for name, help_text, func, positional in commands:
        p = sub.add_parser(name, help=help_text)
        if positional is not None:
            p.add_argument(positional[0], **positional[1])
        if name == "rollback":
            p.add_argument("--to", type=int, metavar="REV",
                           help="the revision to restore (default: the one before the current one); "
                                "an undeployed function is deployed again")
        if name == "deploy":
            p.add_argument("--trust", action="append", default=[], metavar="PREFIX",
                           help="also accept handlers under this module prefix (repeatable; $RUNTIME_TRUST, "
                                "comma-separated); functions is always trusted")
            p.add_argument("--replicas", type=int, default=None, metavar="N",
                           help="copies of the registry bucket, and of the invocation streams if no runtime "
                                "created them yet ($RUNTIME_REPLICAS; default: keep what exists, else 1)")
        if name == "undeploy":
            p.add_argument("--force", action="store_true",
                           help="also undeploy the standalone schedules that target the function")
            common.add_yes_option(p)
        common.add_server_option(p)
        common.add_json_option(p)
        p.set_defaults(func=func)


def check_trusted(manifests: ManifestSet, prefixes: tuple[str, ...]) -> None:
    """Refuse (ManifestError, naming the file) a handler outside ``prefixes``, before anything imports it."""
    for manifest in manifests.functions.values():
        reason = trust.refusal(manifest.name, manifest.handler, prefixes)
        if reason is not None:
            source = manifests.sources.get(f"Function:{manifest.name}", manifest.name)
            raise ManifestError(source, [("", reason)])


def replicas(given: int | None) -> int | None:
    """``--replicas``, else ``$RUNTIME_REPLICAS`` (checked like the option), else None: keep what exists."""
    value: object = given if given is not None else os.environ.get("RUNTIME_REPLICAS", "").strip() or None
    if value is None:
        return None
    if not str(value).isdigit() or not 1 <= int(str(value)) <= MAX_REPLICAS:
        source = "--replicas" if given is not None else "RUNTIME_REPLICAS"
        raise ConfigError(f"{source}={value!r}: replicas is a number from 1 to {MAX_REPLICAS}")
    return int(str(value))


def cmd_deploy(args: argparse.Namespace) -> int:
    root = Path.cwd()
    # The runtimes' own default plus what the deployer says: never the packages being deployed.
    prefixes = trust.deploy_prefixes(trust.combine(trust.env_prefixes(), trust.parse_prefixes(args.trust)))
    if not manifest_files(args.paths):
        # Deploying nothing is a mistyped path far more often than an intent: say so before connecting.
        raise ManifestError(", ".join(args.paths), [("", "no manifests found (*.yaml or *.yml files)")])

    async def main() -> list[dict[str, Any]]:
        async with common.connection(args) as (_, js):
            registry = await Registry.open(js, replicas(args.replicas))
            known = {d.manifest.name for d in (await registry.all()).values() if d.manifest.kind == "Function"}
            manifests = ManifestSet.load(args.paths, known_functions=known)
            check_trusted(manifests, prefixes)
            for manifest in manifests.functions.values():
                # The same checks a runtime makes; a module that exits at import is one error line
                # that names the manifest, as a bad field would.
                source = manifests.sources.get(f"Function:{manifest.name}", manifest.name)
                try:
                    handler = await load_handler_async(manifest.handler, root=root)
                except LoadError as exc:
                    raise ManifestError(source, [("handler", str(exc))]) from None
                outside = trust.defined_outside(manifest.name, manifest.handler, handler.func, prefixes)
                if outside is not None:
                    raise ManifestError(source, [("handler", outside)])
            return [vars(r) for r in await registry.deploy(manifests)]

    results = run(main())
    if args.json:
        common.print_json(results)
    for r in [] if args.json else results:
        detail = f" ({', '.join(r['changed'])})" if r["changed"] else ""
        print(f"{r['kind'].lower()} {r['name']}: {r['status']}{detail} [revision {r['revision']}]")
    return RET_OK


async def _undeploy_question(args: argparse.Namespace) -> str | None:
    """What an undeploy will remove, as the question to confirm; None if the registry will refuse it anyway."""
    async with common.connection(args) as (_, js):
        deployments = await (await Registry.open(js)).all()
        function = deployments.get(args.name)
        if function is not None and isinstance(function.manifest, FunctionManifest):
            targeting = sorted(d.manifest.name for d in deployments.values()
                               if isinstance(d.manifest, ScheduleManifest) and d.manifest.function == args.name)
            if targeting and not args.force:
                return None  # refused, naming them: nothing to confirm
            schedules = [s.name for s in function.manifest.schedules] + targeting
            also = f" and schedule{'s' * (len(schedules) > 1)} {', '.join(schedules)}" if schedules else ""
            waiting = (await queue.queue_state(js, args.name)).total
            kept = f" ({waiting} waiting invocation{'s' * (waiting != 1)} kept in FN)" if waiting else ""
            return f"undeploy function {args.name}{also}{kept}?"
    if any(isinstance(d.manifest, ScheduleManifest) and d.manifest.name == args.name for d in deployments.values()):
        return f"undeploy schedule {args.name}?"
    if any(isinstance(d.manifest, TriggerManifest) and d.manifest.name == args.name for d in deployments.values()):
        return f"undeploy trigger {args.name} (events it matches are kept for it until it is deployed again)?"
    return None  # nothing by that name: the registry says so


def cmd_undeploy(args: argparse.Namespace) -> int:
    question = run(_undeploy_question(args))
    if question is not None:
        common.confirm(args, question)

    async def main() -> Undeployed:
        async with common.connection(args) as (_, js):
            return await (await Registry.open(js)).undeploy(args.name, force=args.force)

    done = run(main())
    if args.json:
        common.print_json({**vars(done), "status": "undeployed"})
        return RET_OK
    for schedule in done.schedules:
        print(f"schedule {schedule}: undeployed (it targeted {done.name})")
    for trigger in done.triggers:
        print(f"trigger {trigger}: undeployed (it targeted {done.name})")
    if done.kind == "Schedule":
        print(f"schedule {done.name}: undeployed (it fires no more; its function stays deployed)")
        return RET_OK
    if done.kind == "Trigger":
        print(f"trigger {done.name}: undeployed (its events are kept for it until it is deployed again)")
        return RET_OK
    own = f", with its schedule{'s' * (len(done.own_schedules) > 1)} {', '.join(done.own_schedules)}" \
        if done.own_schedules else ""
    print(f"function {done.name}: undeployed{own} (queued messages are kept until it is deployed again)")
    return RET_OK


def _registry_errors(args: argparse.Namespace, command: Callable[[], int]) -> int:
    """A registry refusal in the user's words; an unknown name or revision has its own exit code."""
    try:
        return command()
    except RegistryError as exc:
        if args.debug:
            raise
        common.error(str(exc))
        return RET_NOT_FOUND if isinstance(exc, NotDeployed) else RET_ERROR


def local_time(iso: str) -> str:
    """A stored UTC time stamp as the local time it was (as ``ls`` and ``history`` show times)."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    except ValueError:
        return iso or "-"


def cmd_rollback(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        async with common.connection(args) as (_, js):
            return vars(await (await Registry.open(js)).rollback(args.name, args.to))

    def rollback() -> int:
        result = run(main())
        if args.json:
            common.print_json(result)
            return RET_OK
        what = f"{result['kind'].lower()} {result['name']}"
        if result["status"] == "unchanged":
            print(f"{what}: unchanged, revision {result['restored']} is what is deployed "
                  f"[revision {result['revision']}]")
            return RET_OK
        detail = f" ({', '.join(result['changed'])})" if result["changed"] else ""
        print(f"{what}: rolled back to revision {result['restored']}{detail} [revision {result['revision']}]")
        return RET_OK

    return _registry_errors(args, rollback)


def cmd_history(args: argparse.Namespace) -> int:
    async def main() -> tuple[str, list[dict[str, Any]]]:
        async with common.connection(args) as (_, js):
            key, kept = await (await Registry.open(js)).revisions_of(args.name)
            kind = "Schedule" if key.startswith(SCHEDULE_PREFIX) else "Function"
            return kind, [r.to_json() for r in reversed(kept)]

    def history() -> int:
        kind, rows = run(main())
        if args.json:
            common.print_json([{"name": args.name, "kind": kind, **row} for row in rows])
            return RET_OK
        common.print_table(["rev", "deployed at", "change"],
                           [[r["revision"], local_time(r["deployed_at"]), r["change"]] for r in rows])
        return RET_OK

    return _registry_errors(args, history)


async def _listing(args: argparse.Namespace) -> list[dict[str, Any]]:
    async with common.connection(args) as (nc, js):
        deployments = await (await Registry.open(js)).all()
        functions = {d.manifest.name for d in deployments.values() if d.manifest.kind == "Function"}
        statuses = await gather_status(nc)
        waiting = {state.function: state for state in await queue.queue_states(js)}
        limit = (await js.stream_info(INVOKE_STREAM)).config.max_msgs_per_subject or -1
        deployed = as_manifest_set(deployments)
        by_trigger = {(t.function, t.trigger): t for t in await trigger_rows(js, deployed.functions.values(),
                                                                             deployed.triggers.values())}
        rows = []
        for dep in sorted(deployments.values(), key=lambda d: (d.manifest.kind, d.manifest.name)):
            m = dep.manifest
            row: dict[str, Any] = {"name": m.name, "kind": m.kind, "revision": dep.revision,
                                   "deployed_at": dep.deployed_at}
            if isinstance(m, FunctionManifest):
                state = waiting.get(m.name)
                failing = {s["runtime"]: s["failing"][m.name] for s in statuses if m.name in s.get("failing", {})}
                # Runtimes from before trusted prefixes report no "refused".
                refused = {s["runtime"]: s["refused"][m.name] for s in statuses if m.name in s.get("refused", {})}
                serving = [s["runtime"] for s in statuses if m.name in s.get("serving", {})]
                row.update(settings=(f"concurrency={m.concurrency} priority={m.priority} timeout={m.timeout:g}s "
                                     f"max_deliver={m.retry.max_deliver}"
                                     + (f" max_queued={limit}/level" if limit > 0 else "")),
                           queued=state.queued if state else 0, in_flight=state.in_flight if state else 0,
                           levels=per_level(state.subjects if state else {}, m.name, m.priority),
                           delayed=await delayed_count(js, m.name), max_queued=limit if limit > 0 else None,
                           runtimes=len(serving),
                           status="paused" if state and state.paused_until else _function_status(failing, refused,
                                                                                                 serving),
                           failing=failing, refused=refused,
                           triggers=[_trigger_json(t) for (f, _), t in by_trigger.items() if f == m.name])
            elif isinstance(m, TriggerManifest):
                where = f" (stream {m.stream})" if m.stream else ""
                row.update(settings=f"on {m.subject}{where} -> {m.function}", queued="", in_flight="", levels={},
                           delayed="", max_queued=None, runtimes="",
                           status="deployed" if m.function in functions else "no function", failing={}, refused={},
                           triggers=[_trigger_json(t) for t in [by_trigger.get((m.function, m.name))] if t])
            else:
                row.update(settings=f"cron={m.cron!r} -> {m.function}", queued="", in_flight="", levels={},
                           delayed="", max_queued=None, runtimes="",
                           status=_schedule_status(m.enabled, m.function in functions), failing={}, refused={},
                           triggers=[])
            rows.append(row)
        return rows


def _trigger_json(t: TriggerRow) -> dict[str, Any]:
    return {"name": t.trigger, "subject": t.subject, "stream": t.stream, "backlog": t.backlog, "status": t.status}


def _events_cell(row: dict[str, Any]) -> str:
    """The events a function's (or a standalone trigger's) triggers have waiting; "-" if none has a consumer."""
    triggers: list[dict[str, Any]] = row["triggers"]
    if not triggers:
        return ""
    waiting = [t["backlog"] for t in triggers if t["backlog"] is not None]
    return str(sum(waiting)) if waiting else "-"


def per_level(subjects: dict[str, int], function: str, default: int) -> dict[int, int]:
    """What waits (queued or in flight) per level, most urgent first; the plain subject is the default level."""
    levels: dict[int, int] = {}
    for subject, count in subjects.items():
        try:
            named, level = split_subject(subject)
        except ValueError:
            continue
        if named == function and count:
            key = default if level is None else level
            levels[key] = levels.get(key, 0) + count
    return dict(sorted(levels.items(), reverse=True))


def _queued_cell(row: dict[str, Any]) -> str:
    """``12`` at one level; ``12 (10:2 5:10)`` when several levels have work waiting."""
    levels: dict[int, int] = row["levels"]
    if len(levels) < 2:
        return str(row["queued"])
    return f"{row['queued']} ({' '.join(f'{lv}:{n}' for lv, n in levels.items())})"


def _function_status(failing: dict[str, str], refused: dict[str, str], serving: list[str]) -> str:
    # A refusal is a decision, not a breakage: it says so even where another runtime fails or serves.
    if refused:
        return "refused"
    if failing:
        return "failing"
    return "serving" if serving else "idle"


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
    common.print_table(["name", "kind", "rev", "deployed at", "status", "runtimes", "queued", "in flight",
                        "delayed", "events", "settings"],
                       [[r["name"], r["kind"].lower(), r["revision"], local_time(r["deployed_at"]), r["status"],
                         r["runtimes"], _queued_cell(r) if r["kind"] == "Function" else "", r["in_flight"],
                         r["delayed"], _events_cell(r), r["settings"]] for r in rows])
    for r in rows:
        for t in r["triggers"] if r["kind"] == "Function" else []:
            consumer = f"backlog {t['backlog']}" if t["backlog"] is not None else "no consumer yet"
            print(f"  {r['name']} on {t['subject']} (trigger {t['name']}, stream {t['stream']}): {consumer}")
        for runtime, error in r["failing"].items():
            print(f"  {r['name']} failing on {runtime}: {error}")
        for runtime, reason in r["refused"].items():
            print(f"  {r['name']} refused on {runtime}: {reason}")
    return RET_OK
