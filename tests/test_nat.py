"""Two nodes behind NATs, through the real ``eidetica-node`` daemon and CLI, in network namespaces.

R is public and runs ``eidetica-node run --relay-service``; A sits behind NAT G1 and B behind
NAT G2 (masquerade; unsolicited inbound dropped, or answered with a reset), and both run
``eidetica-node run --relay R`` (``scripts/netns.py`` builds the topology, ``scripts/cli_node.py``
drives the binary; the CLI reaches each daemon over the control socket in its data
directory, and the probes whose timing is measured send the same commands straight to that
socket, without an interpreter start per probe). B joins A's database as soon as A's ticket
carries the circuit address, without waiting for anything else. Then:

* NATs that drop: hole punching (DCUtR) makes A<->B direct within 10 s of the join, both
  ends record it, and the relayed connection is closed once the direct one carries traffic;
* NATs that reset: the punch fails, both ends record why, and sync goes on over the relay;
  the relay restarts and sync resumes within 3 s of it being back.

The times are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from node.errors import ControlError
from scripts.cli_node import NodeProcess
from scripts.netns import NatTopology, cleanup_stale
from tests.conftest import require_netns
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

PREFIX = "eidnat-"  # namespaces of this file (scripts/netns.py: <prefix><8 hex>-<node>)
PORT = 4001  # every node listens here (each in its own namespace)
DIRECT_WITHIN_S = 10.0  # the join to a direct connection, both ends (the bound)
RESUME_WITHIN_S = 3.0  # the relay back up to a write on A seen by B
PUNCH_FAIL_S = 40.0  # a punch defeated by resets: py-libp2p's three rounds take ~21 s
STATE_S = 20.0  # a status or value the test waits for (each CLI call is a fresh interpreter)


def _start(topo: NatTopology, name: str, tmp: Path, *extra: str) -> NodeProcess:
    return NodeProcess.start(
        tmp / name,
        "--name",
        name,
        "--no-http",
        *extra,
        network=["--p2p-listen", f"/ip4/0.0.0.0/tcp/{PORT}"],
        launcher=["ip", "netns", "exec", topo.ns[name]],
    )


def p2p(node: NodeProcess, *, cli: bool = False) -> dict[str, Any]:
    """The libp2p transport's status, as ``eidetica-node status --json`` shows it (``cli``: from
    the CLI itself; else the same command straight over the control socket, for polling)."""
    status = node.json("status") if cli else node.call("status")
    [transport] = [t for t in status["node"]["transports"] if t["name"] == "p2p"]
    report: dict[str, Any] = transport["status"]
    return report


def _peer(status: dict[str, Any], peer_id: str) -> dict[str, Any] | None:
    return next((p for p in status["peers"] if p["peer_id"] == peer_id), None)


def _punch(status: dict[str, Any], peer_id: str) -> dict[str, Any] | None:
    return next((h for h in status["hole_punches"] if h["peer"] == peer_id), None)


def _wait(node: NodeProcess, what: str, done: Callable[[dict[str, Any]], object], timeout_s: float) -> dict[str, Any]:
    return wait_until(
        lambda: p2p(node),
        f"{node.data_dir.name}: {what}",
        timeout_s=timeout_s,
        poll_s=0.2,
        done=done,
        detail=lambda: node.stderr()[-5000:],
    )


def _value(node: NodeProcess, db: str, key: str) -> Any:
    """``key``'s value on ``node``, None while it has none."""
    try:
        return node.call("db.get", db=db, key=key)["value"]
    except ControlError:
        return None


def _seen(node: NodeProcess, db: str, key: str, value: str, timeout_s: float = STATE_S) -> float:
    """Seconds until ``key`` reads ``value`` on ``node``."""
    started = time.monotonic()
    wait_until(
        lambda: _value(node, db, key),
        f"{node.data_dir.name}: {key}={value!r} arriving",
        timeout_s=timeout_s,
        poll_s=0.05,
        done=lambda seen: seen == value,
        detail=lambda: node.stderr()[-5000:],
    )
    return time.monotonic() - started


class Lab:
    """The topology, R, A and B running, and B just joined A's database."""

    def __init__(self, topo: NatTopology, tmp: Path, stack: ExitStack) -> None:
        self.topo, self.tmp = topo, tmp
        self.nodes: list[NodeProcess] = []
        stack.callback(self.stop)
        self.relay = self.start("r", "--relay-service")
        [relay_address] = [a for a in self.relay.ready["addresses"] if a.startswith(f"p2p:/ip4/{topo.addr['r']}/")]
        self.relay_address = relay_address.removeprefix("p2p:")
        with ThreadPoolExecutor(2) as pool:  # the interpreters start in parallel
            a, b = pool.map(lambda name: self.start(name, "--relay", self.relay_address), ["a", "b"])
        self.a, self.b = a, b
        self.a_peer, self.b_peer = p2p(a)["peer_id"], p2p(b)["peer_id"]
        self.db = json.loads(a.ok("db", "create", "notes", "--public", "write:10", "--json"))["id"]
        a.call("db.set", db=self.db, key="title", value="from a")
        circuit = f"p2p:{self.relay_address}/p2p-circuit/p2p/{self.a_peer}"
        ticket = wait_until(
            lambda: json.loads(a.ok("share", self.db, "--json"))["ticket"],
            "A's ticket carrying its circuit address",
            timeout_s=STATE_S,
            done=lambda t: circuit in t,
        )
        self.joined_at = time.time()
        started = time.monotonic()
        b.ok("join", ticket)
        print(f"\njoin through the relay: {time.monotonic() - started:.2f} s")
        assert _value(b, self.db, "title") == "from a"

    def start(self, name: str, *extra: str) -> NodeProcess:
        node = _start(self.topo, name, self.tmp, *extra)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """SIGTERM every node at once (each flushes sync for a moment), then wait for all."""
        with ThreadPoolExecutor(len(self.nodes) or 1) as pool:
            list(pool.map(NodeProcess.stop, self.nodes))

    def writes_cross(self, tag: str) -> None:
        """A write on each side reaches the other."""
        self.a.ok("db", "set", self.db, f"{tag}_a", "hello b")
        print(f"{tag}: A -> B {_seen(self.b, self.db, f'{tag}_a', 'hello b'):.2f} s")
        self.b.call("db.set", db=self.db, key=f"{tag}_b", value="hello a")
        print(f"{tag}: B -> A {_seen(self.a, self.db, f'{tag}_b', 'hello a'):.2f} s")


@contextmanager
def lab(tmp: Path, *, rst_unsolicited: bool) -> Iterator[Lab]:
    require_netns()
    cleanup_stale(PREFIX)
    with NatTopology(rst_unsolicited=rst_unsolicited, prefix=PREFIX) as topo, ExitStack() as stack:
        yield Lab(topo, tmp, stack)


def test_hole_punching_makes_the_daemons_direct_soon_after_a_join(tmp_path: Path) -> None:
    with lab(tmp_path, rst_unsolicited=False) as net:
        _wait(
            net.a, "a direct connection to B", lambda s: (_peer(s, net.b_peer) or {}).get("kind") == "direct", STATE_S
        )
        _wait(net.b, "B's record of the punch", lambda s: _punch(s, net.a_peer) is not None, STATE_S)
        a_status, b_status = p2p(net.a, cli=True), p2p(net.b, cli=True)  # what `status --json` shows
        a_punch, b_punch = _punch(a_status, net.b_peer), _punch(b_status, net.a_peer)
        assert a_punch is not None and b_punch is not None, a_status
        # The end that accepted the relayed connection (A) started it; B answered. Both succeeded.
        assert (a_punch["role"], b_punch["role"]) == ("initiator", "responder")
        for punch in (a_punch, b_punch):
            assert punch["succeeded"] and punch["outcome"] == "direct" and punch["error"] is None, punch
            assert net.joined_at < punch["started_at"] < punch["at"]
            assert punch["duration_s"] == pytest.approx(punch["at"] - punch["started_at"], abs=0.05)
        assert "initiator  direct in" in net.a.ok("info")  # and `info` says so in words
        direct_s = max(a_punch["at"], b_punch["at"]) - net.joined_at
        print(f"join -> direct (both ends): {direct_s:.2f} s; punch {a_punch['duration_s']:.2f} s (A)")
        assert direct_s < DIRECT_WITHIN_S
        assert (_peer(p2p(net.b), net.a_peer) or {}).get("kind") == "direct"

        # The relayed connection is closed once the direct one carried traffic: one connection
        # each way, no circuit left on R.
        _wait(net.relay, "R's circuit closed", lambda s: s["relay_service"]["active_circuits"] == 0, STATE_S)
        for node, peer in ((net.a, net.b_peer), (net.b, net.a_peer)):
            view = _peer(p2p(node), peer)
            assert view is not None and view["kind"] == "direct" and view["connections"] == 1, view
        net.writes_cross("direct")


def test_a_punch_the_nats_reset_is_reported_on_both_ends_and_sync_stays_relayed(tmp_path: Path) -> None:
    with lab(tmp_path, rst_unsolicited=True) as net:
        _wait(net.a, "A's failed punch", lambda s: _punch(s, net.b_peer) is not None, PUNCH_FAIL_S)
        _wait(net.b, "B's failed punch", lambda s: _punch(s, net.a_peer) is not None, STATE_S)
        a_status, b_status = p2p(net.a, cli=True), p2p(net.b, cli=True)  # what `status --json` shows
        for status, peer in ((a_status, net.b_peer), (b_status, net.a_peer)):
            punch = _punch(status, peer)
            assert punch is not None and not punch["succeeded"] and punch["outcome"] == "failed", punch
            assert punch["error"] and "refused" in punch["error"].lower(), punch  # the reset, named
            print(f"{punch['role']}: failed after {punch['duration_s']:.2f} s: {punch['error']}")
            assert [h for h in status["hole_punch_history"] if h["peer"] == peer][-1] == punch
        assert "responder  failed after" in net.b.ok("info") and "refused" in net.b.ok("info")
        assert (_peer(a_status, net.b_peer) or {}).get("kind") == "relayed"
        net.writes_cross("relayed")

        # R restarts (same key, same port): the reservations come back and sync resumes.
        net.relay.stop()
        _wait(net.a, "A lost its reservation", lambda s: s["reservations"][0]["state"] != "reserved", STATE_S)
        net.relay = net.start("r", "--relay-service")
        back = time.monotonic()
        net.a.call("db.set", db=net.db, key="after_restart", value="from a")
        _seen(net.b, net.db, "after_restart", "from a", timeout_s=STATE_S)
        resumed_s = time.monotonic() - back
        print(f"relay back up -> a write on A seen by B: {resumed_s:.2f} s")
        assert resumed_s < RESUME_WITHIN_S
