"""A real three-node JetStream cluster on loopback ports: the ``cluster`` fixture, also used by benchmarks.

Each node is a nats-server process with its own store and the routes to the others. The node
configurations are those of ``deploy/cluster`` (what ``docker compose --profile cluster`` runs),
with their ports, routes and store directory remapped to loopback and a temporary directory, so
the tests run what the compose file ships. Nodes are killed (SIGKILL by PID) and restarted one by one
on the same ports and stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from runtime.server import EmbeddedServer, find_binary, free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "deploy" / "cluster"
NAMES = ("n1", "n2", "n3")
CLIENT_PORT, CLUSTER_PORT, MONITOR_PORT = 4222, 6222, 8222
PROBE = "CLUSTER_PROBE"


def node_configs(directory: Path = CONFIGS, names: Iterable[str] = NAMES) -> dict[str, str]:
    """The configuration text of each node, as shipped."""
    return {name: (directory / f"{name}.conf").read_text() for name in names}


def remap(text: str, ports: Mapping[str, tuple[int, int]], name: str, store: Path) -> str:
    """A node's configuration on loopback: ``ports`` maps each node to its (client, cluster) port."""
    client, cluster = ports[name]
    text = re.sub(r"^\s*#.*$", "", text, flags=re.M)   # comments name the compose hosts too
    text = re.sub(rf"\b0\.0\.0\.0:{CLIENT_PORT}\b", f"127.0.0.1:{client}", text)
    text = re.sub(rf"\b0\.0\.0\.0:{CLUSTER_PORT}\b", f"127.0.0.1:{cluster}", text)
    text = re.sub(rf"^\s*http(_port)?\s*:.*{MONITOR_PORT}.*$", "", text, flags=re.M)   # no monitoring port
    for other, (_, other_cluster) in ports.items():
        text = re.sub(rf"nats://{other}:{CLUSTER_PORT}\b", f"nats://127.0.0.1:{other_cluster}", text)
    text = re.sub(r"store_dir\s*:\s*\S+", f'store_dir: "{store}"', text)
    if re.search(r"\b(n\d|0\.0\.0\.0):\d+", text):
        raise ValueError(f"{name}: an address left unmapped in\n{text}")
    return text


class ConfiguredServer(EmbeddedServer):
    """nats-server started with its configuration file alone (ports and store come from it)."""

    def command(self) -> list[str]:
        assert self.config is not None
        return [find_binary(), "-c", str(self.config)]


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    directory: Path
    server: ConfiguredServer = field(init=False)

    def __post_init__(self) -> None:
        self.server = ConfiguredServer(self.directory, port=self.port, config=self.directory / "node.conf")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.server.proc is not None, f"{self.name} is not running"
        return self.server.proc.pid


class Cluster:
    """Three nats-server nodes with JetStream and routes. ``async with Cluster(directory) as cluster``."""

    def __init__(self, directory: Path, configs: Mapping[str, str] | None = None) -> None:
        configs = dict(configs or node_configs())
        ports = {name: (free_port(), free_port()) for name in configs}
        self.nodes: dict[str, Node] = {}
        for name, text in configs.items():
            node_dir = directory / name
            (node_dir / "store").mkdir(parents=True, exist_ok=True)
            (node_dir / "node.conf").write_text(remap(text, ports, name, node_dir / "store"))
            self.nodes[name] = Node(name, *ports[name], node_dir)

    @property
    def url(self) -> str:
        """Every node, comma-separated (as ``--server`` and ``NATS_URL`` take them)."""
        return ",".join(node.url for node in self.nodes.values())

    def urls(self, *names: str) -> str:
        return ",".join(self.nodes[n].url for n in names)

    async def start(self, timeout: float = 30.0) -> None:
        await asyncio.gather(*(n.server.start() for n in self.nodes.values()))
        await self.wait_ready(timeout)

    async def stop(self) -> None:
        """Kill every node: the stores are thrown away (a clean stop saves every consumer first)."""
        await asyncio.gather(*(n.server.stop(discard=True) for n in self.nodes.values()), return_exceptions=True)

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def connect(self, **options: object) -> NATS:
        """A connection to any live node, reconnecting to the others."""
        live = [n.url for n in self.nodes.values() if n.running]
        return await nats.connect(servers=live, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                  connect_timeout=2, **options)

    async def wait_ready(self, timeout: float = 30.0, replicas: int | None = None) -> None:
        """Until the live nodes have a JetStream meta leader and can place a stream on ``replicas``
        peers (default: every live node)."""
        replicas = replicas or sum(n.running for n in self.nodes.values())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        nc = await self.connect()
        js = nc.jetstream(timeout=2)
        last: BaseException | None = None
        try:
            while loop.time() < deadline:
                try:
                    await js.account_info()
                    await js.add_stream(StreamConfig(name=PROBE, subjects=["cluster.probe"], num_replicas=replicas,
                                                     storage=StorageType.MEMORY))
                    await js.publish("cluster.probe", b"", stream=PROBE)
                    await js.delete_stream(PROBE)
                    return
                except Exception as exc:   # no meta leader yet, peers not current yet...
                    last = exc
                    await asyncio.sleep(0.2)
            raise TimeoutError(f"the cluster had no JetStream meta leader with {replicas} peers within "
                               f"{timeout:g}s (last: {last!r})")
        finally:
            await nc.close()

    def kill(self, name: str) -> None:
        """SIGKILL one node (its process alone, by PID): what an OS crash does to that machine's server."""
        node = self.nodes[name]
        proc = node.server.proc
        assert proc is not None and proc.poll() is None, f"{name} is not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        node.server.proc = None

    async def stop_node(self, name: str) -> None:
        """Stop one node cleanly (SIGTERM)."""
        await self.nodes[name].server.stop()

    async def restart(self, name: str) -> None:
        """Start a stopped or killed node again, on its ports and store."""
        await self.nodes[name].server.start()

    def node_named(self, server_name: str | None) -> Node | None:
        return self.nodes.get(server_name or "")

    async def leader_of(self, nc: NATS, stream: str, timeout: float = 15.0) -> str:
        """The name of the node that leads ``stream`` (waits through an election)."""
        js = nc.jetstream(timeout=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(Exception):
                info = await js.stream_info(stream)
                leader = info.cluster.leader if info.cluster else None
                if leader in self.nodes and self.nodes[leader].running:
                    return leader
            if loop.time() > deadline:
                raise TimeoutError(f"{stream} had no leader within {timeout:g}s")
            await asyncio.sleep(0.1)

    async def replicas_of(self, nc: NATS, stream: str) -> int:
        info = await nc.jetstream(timeout=5).stream_info(stream)
        return info.config.num_replicas or 1

    async def wait_current(self, nc: NATS, streams: Iterable[str], timeout: float = 30.0) -> None:
        """Until every replica of ``streams`` is current (after a node came back)."""
        js = nc.jetstream(timeout=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(streams)
        while pending:
            for stream in sorted(pending):
                with contextlib.suppress(NotFoundError, Exception):
                    info = await js.stream_info(stream)
                    cluster = info.cluster
                    peers = list(cluster.replicas or []) if cluster else []
                    if (cluster and cluster.leader and len(peers) + 1 >= (info.config.num_replicas or 1)
                            and all(r.current and not r.offline for r in peers)):
                        pending.discard(stream)
            if pending and loop.time() > deadline:
                raise TimeoutError(f"replicas of {', '.join(sorted(pending))} not current within {timeout:g}s")
            if pending:
                await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def start_cluster(directory: Path, configs: Mapping[str, str] | None = None) -> AsyncIterator[Cluster]:
    """A running cluster (meta leader elected, R3 placement possible) in ``directory``; stopped after."""
    async with Cluster(directory, configs) as cluster:
        yield cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A fresh three-node JetStream cluster on loopback (nodes n1, n2, n3)."""
    async with start_cluster(tmp_path / "cluster") as running:
        yield running
