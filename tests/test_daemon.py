"""The node daemon in-process: control API, metrics, peer state, shutdown flush.

Nodes run as trio tasks here (HTTP on loopback, libp2p off, so each starts in
milliseconds); the control API is reached over its real unix socket with the async
client. The same daemon in its own process is what tests/test_cli.py drives.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from dag import Instance
from node.client import AsyncControlClient
from node.config import NodeConfig
from node.daemon import run_node
from node.errors import ControlError
from node.metrics import Metrics, wire_size
from node.service import NodeService
from sync.messages import Bootstrap, Handshake, SyncTree, encode_message
from sync.transport import TaskStatus
from tests.waiting import until_awaited

WAIT_S = 30.0


class Node:
    """One in-process node: its service, a client, and the scope that stops it."""

    def __init__(self, service: NodeService, scope: trio.CancelScope, client: AsyncControlClient) -> None:
        self.service = service
        self.scope = scope
        self.client = client

    async def call(self, command: str, **arguments: Any) -> Any:
        return await self.client.call(command, **arguments)


def free_port() -> int:
    """A port nothing listens on now (for a node that must come back on the same address)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def start(nursery: trio.Nursery, data_dir: Path, *, port: int = 0, **settings: Any) -> Node:
    config = NodeConfig(data_dir=data_dir, p2p=False, http_bind=f"127.0.0.1:{port}", log_level="warning", **settings)
    scope = trio.CancelScope()

    async def run(*, task_status: TaskStatus[NodeService] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await run_node(config, handle_signals=False, task_status=task_status)

    service: NodeService = await nursery.start(run)
    return Node(service, scope, AsyncControlClient(data_dir))


def test_wire_size_is_the_encoded_size() -> None:
    entries = tuple(os.urandom(n) for n in (1, 200, 300, 70_000)) * 5
    for message in (
        Handshake("ed25519:x", "n", 1, b"c" * 32),
        SyncTree(b"d" * 36, tips=(b"t" * 36,), entries=entries),
        Bootstrap(b"d" * 36, (b"t" * 36,), entries[:3], more=True),
        Bootstrap(b"d" * 36, (), ()),
    ):
        assert wire_size(message) == len(encode_message(message))
    metrics = Metrics()
    metrics.exchange("asked", "error", "unreachable")
    metrics.exchange("served", "ok")
    assert metrics.totals()["errors"] == 1 and metrics.totals()["syncs"] == 1


async def test_control_api_socket_errors_and_metrics(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, tmp_path / "n", metrics_bind="127.0.0.1:0")
        socket_path = tmp_path / "n" / "control.sock"
        assert stat.S_ISSOCK(socket_path.stat().st_mode) and stat.S_IMODE(socket_path.stat().st_mode) == 0o600

        created = await node.call("db.create", name="notes")
        await node.call("db.set", db="notes", key="a.b", value=[1, {"c": None}])
        assert await node.call("db.get", db=created["id"], key="a") == {"value": {"b": [1, {"c": None}]}}

        transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as raw:
            answer = await raw.post("/v0/nope", json={})
            assert answer.status_code == 404 and answer.json()["code"] == "unknown_command"
            answer = await raw.post("/v0/db.get", json={"db": "notes", "color": "red"})
            assert answer.status_code == 400 and "unexpected keyword argument 'color'" in answer.json()["error"]
            answer = await raw.post("/v0/db.get", content=b"{not json")
            assert answer.status_code == 400 and answer.json()["error"].startswith("body is not JSON")
            answer = await raw.post("/v0/db.get", json=["notes"])
            assert answer.status_code == 400 and answer.json()["error"] == "arguments are a JSON object"
            answer = await raw.post("/v0/db.show", json={"db": "nothere"})
            assert answer.status_code == 404 and answer.json()["code"] == "not_found"
            answer = await raw.post("/v0/join", json={"ticket": "eidetica:?db=x"})
            assert answer.status_code == 400 and answer.json()["code"] == "bad_ticket"
            assert (await raw.get("/health")).json()["status"] == "ok"
            text = (await raw.get("/metrics")).text
            assert "eidetica_databases 1.0" in text and 'eidetica_entries{status="verified"} 2.0' in text

        with pytest.raises(ControlError, match=r"^the _sync database is the node's own state"):
            await node.call("db.show", db=node.service.sync.state.database_id)
        with pytest.raises(ControlError) as refused:
            await node.call("db.create", name="  ")
        assert refused.value.code == "bad_request"

        assert node.service.metrics_address is not None
        async with httpx.AsyncClient() as tcp:
            text = (await tcp.get(f"http://{node.service.metrics_address}/metrics")).text
            assert "# TYPE eidetica_uptime_seconds gauge" in text
        node.scope.cancel()
    assert not socket_path.exists()


async def test_peer_state_bytes_and_flush_on_shutdown(tmp_path: Path) -> None:
    ports = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        one = await start(nursery, tmp_path / "one", port=ports[0])
        two = await start(nursery, tmp_path / "two", port=ports[1])
        db = (await one.call("db.create", name="notes", public="write:10"))["id"]
        ticket = (await one.call("share", db=db))["ticket"]
        assert (await two.call("join", ticket=ticket))["db"] == db
        # one pushes to two once one's side chooses to (two only read a public database).
        one.service.sync.state.relate(db, two.service.instance.device_id)
        await one.call("db.set", db=db, key="k", value="v1")

        async def arrived() -> bool:
            try:
                return bool((await two.call("db.get", db=db, key="k"))["value"] == "v1")
            except ControlError:
                return False

        await until_awaited(arrived, "v1 on two", timeout_s=WAIT_S)

        async def states() -> list[str]:
            shown = await one.call("db.show", db=db)
            return [p["state"] for p in shown["peers"]]

        async def up_to_date() -> bool:
            return await states() == ["up to date"]

        await until_awaited(up_to_date, "one seeing two up to date", timeout_s=WAIT_S)
        await one.service.sync.flush()
        await two.service.sync.flush()
        # Every byte one sent, two received, and the other way round: both count the same messages.
        one_totals, two_totals = one.service.metrics.totals(), two.service.metrics.totals()
        assert one_totals["bytes_sent"] == two_totals["bytes_received"] > 0
        assert two_totals["bytes_sent"] == one_totals["bytes_received"] > 0

        # two goes away; one writes twice: two is now behind by two entries
        two.scope.cancel()
        await trio.sleep(0.2)
        await one.call("db.set", db=db, key="k", value="v2")
        await one.call("db.set", db=db, key="k", value="v3")
        [peer] = (await one.call("db.show", db=db))["peers"]
        assert peer["state"] == "behind" and peer["behind_by"] == 2
        status = await one.call("status")
        assert status["databases"][0]["peers"][0]["state"] == "behind"
        assert status["peers"][0]["pubkey"] == two.service.instance.device_id

        # a cursor naming an entry one lacks: two is ahead (and behind: diverged)
        with Instance.in_memory() as stranger:
            foreign = stranger.create_database(name="x").root_cid
        state = one.service.sync.state
        cursor = state.cursor(db, two.service.instance.device_id)
        state.record_sync(
            db,
            two.service.instance.device_id,
            now_ms=1,
            common=[*cursor.common, foreign],
            sent=0,
            received=0,
            error=None,
        )
        [peer] = (await one.call("db.show", db=db))["peers"]
        assert peer["state"] == "diverged" and peer["ahead"]
        one.scope.cancel()

    # Shutdown flushes: a write just before stopping still reaches the peer.
    async with trio.open_nursery() as nursery:
        one = await start(nursery, tmp_path / "one", port=ports[0])
        two = await start(nursery, tmp_path / "two", port=ports[1])
        [result] = (await two.call("sync", db=db))["results"]  # two catches up on v2 and v3
        assert result["ok"], result
        await two.call("db.set", db=db, key="last", value="before stop")
        assert (await two.call("stop"))["stopping"]  # as SIGTERM: leaves the sync block, which flushes

        async def landed() -> bool:
            value = (await one.call("db.get", db=db)).get("value", {})
            return bool(value.get("last") == "before stop" and value.get("k") == "v3")

        await until_awaited(landed, "the write made just before stopping", timeout_s=WAIT_S)
        one.scope.cancel()


def test_the_libp2p_transport_is_built_as_configured(tmp_path: Path) -> None:
    from node.daemon import build_transports

    instance = Instance.in_memory()
    config = NodeConfig(data_dir=tmp_path, p2p_listen=("/ip4/127.0.0.1/tcp/0",), http=False, hole_punching=False)
    built = build_transports(config, instance, Metrics())
    assert set(built) == {"p2p"}
    assert built["p2p"].inner._puncher is None  # type: ignore[attr-defined]
    config = NodeConfig(data_dir=tmp_path, p2p_listen=("/ip4/127.0.0.1/tcp/0",), http=False)
    assert build_transports(config, instance, Metrics())["p2p"].inner._puncher is not None  # type: ignore[attr-defined]
