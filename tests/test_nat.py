"""Sync between two nodes behind NATs, through a relay, in network namespaces (scripts/netns.py).

R is public and offers circuit relay v2; A sits behind NAT G1 and B behind NAT G2 (masquerade,
unsolicited inbound dropped), each node in its own process (``scripts.proc_node``). A and B
cannot dial each other, so B joins A's database through R; hole punching (DCUtR) may then
make the connection direct, and its outcome is printed (with NATs that answer unsolicited
SYNs with a reset it fails, and sync stays on the relay). R is restarted and sync resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from scripts.netns import NatTopology, cleanup_stale
from tests.conftest import require_netns
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PORT = 4001  # every node listens here (each in its own namespace)
READY_TIMEOUT_S = 60.0  # a fresh interpreter importing py-libp2p, trio and the node
LINE_TIMEOUT_S = 40.0  # one command: at most a handshake and a bootstrap through the relay
STATE_TIMEOUT_S = 60.0  # reachability (a dial-back that times out: 5 s), reservations, hole punching
SYNC_TIMEOUT_S = 60.0  # a commit reaching the other side, retries after a relay restart included
PROBE_TIMEOUT_S = 3.0  # a direct TCP connect that the NAT must swallow


class NsNode:
    """One ``scripts.proc_node`` process inside a namespace, driven over stdin/stdout."""

    def __init__(self, topo: NatTopology, node: str, data_dir: Path, *extra: str) -> None:
        self.name = node
        self.stderr_path = data_dir.parent / f"{node}.stderr"
        argv = [sys.executable, "-m", "scripts.proc_node", "--transport", "p2p", "--data-dir", str(data_dir)]
        argv += ["--bind", f"/ip4/0.0.0.0/tcp/{PORT}", "--name", node, *extra]
        with self.stderr_path.open("ab") as stderr:
            self.process = topo.run(node, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
        self._buffer = b""
        self.ready = self.line(READY_TIMEOUT_S)
        assert self.ready.get("ready"), f"{node} did not start: {self.ready}; stderr:\n{self.stderr()}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-6000:]

    def line(self, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"{self.name}: no answer in {timeout_s:g} s; stderr:\n{self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"{self.name} exited; stderr:\n{self.stderr()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, text: str, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()
        answer = self.line(timeout_s)
        assert answer.get("ok"), f"{self.name}: {text!r} failed: {answer}; stderr:\n{self.stderr()}"
        return answer

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.command("status")["status"]
        return status

    def wait_status(self, what: str, predicate: Any, timeout_s: float = STATE_TIMEOUT_S) -> dict[str, Any]:
        return wait_until(self.status, f"{self.name}: {what}", timeout_s=timeout_s, poll_s=0.2, done=predicate)

    def wait_value(self, db: str, key: str, value: str, timeout_s: float = SYNC_TIMEOUT_S) -> float:
        """Seconds until ``key`` reads ``value``."""
        started = time.monotonic()
        wait_until(
            lambda: self.command(f"get {db} {key}")["value"],
            f"{self.name}: {key}={value!r} arriving",
            timeout_s=timeout_s,
            done=lambda seen: seen == value,
            detail=lambda: f"stderr:\n{self.stderr()}",
        )
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def _can_connect(topo: NatTopology, node: str, host: str, port: int) -> bool:
    code = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(float(sys.argv[3]))\n"
        "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('yes')\n"
        "except OSError as e:\n    print('no', e)\n"
    )
    done = topo.python(node, code, host, str(port), str(PROBE_TIMEOUT_S), timeout=PROBE_TIMEOUT_S + 5)
    return done.stdout.startswith("yes")


def _peer(status: dict[str, Any], peer_id: str) -> dict[str, Any] | None:
    return next((p for p in status["peers"] if p["peer_id"] == peer_id), None)


def _reserved(status: dict[str, Any]) -> bool:
    return bool(status["reservations"]) and all(r["state"] == "reserved" for r in status["reservations"])


def _private_and_reserved(status: dict[str, Any]) -> bool:
    return status["reachability"] == "private" and _reserved(status)


@pytest.mark.parametrize(
    ("hole_punching", "rst_unsolicited"),
    [(True, False), (True, True), (False, False)],
    ids=["holepunch", "holepunch-nat-sends-rst", "relay-only"],
)
def test_sync_through_relay_between_two_nats(hole_punching: bool, rst_unsolicited: bool, tmp_path: Path) -> None:
    """``rst_unsolicited``: the NATs answer unsolicited SYNs with a reset, which defeats the punch."""
    require_netns()
    cleanup_stale()
    nodes: list[NsNode] = []
    with NatTopology(rst_unsolicited=rst_unsolicited) as topo:
        try:
            relay = NsNode(topo, "r", tmp_path / "r", "--relay-service", "--relay-ttl", "20")
            nodes.append(relay)
            relay_peer = relay.status()["peer_id"]
            relay_address = f"/ip4/{topo.addr['r']}/tcp/{PORT}/p2p/{relay_peer}"
            extra = ["--relay", relay_address] + ([] if hole_punching else ["--no-hole-punching"])
            a = NsNode(topo, "a", tmp_path / "a", *extra)
            nodes.append(a)
            b = NsNode(topo, "b", tmp_path / "b", *extra)
            nodes.append(b)
            a_peer, b_peer = a.status()["peer_id"], b.status()["peer_id"]

            # A and B cannot reach each other directly, at private or public addresses; both reach R.
            for src, dst in (("a", "b"), ("b", "a")):
                assert not _can_connect(topo, src, topo.addr[dst], PORT), f"{src} reached {dst} directly"
                assert not _can_connect(topo, src, topo.public_addr(dst), PORT), f"{src} reached {dst}'s NAT"
                assert _can_connect(topo, src, topo.addr["r"], PORT)

            # Reachability from real dial-backs: A and B are private, R is public, and R saw it too.
            a_status = a.wait_status(
                "A private and reserved", lambda s: s["reachability"] == "private" and _reserved(s)
            )
            b.wait_status("B private and reserved", lambda s: s["reachability"] == "private" and _reserved(s))
            r_status = relay.wait_status(
                "R public, A and B seen private",
                lambda s: (
                    s["reachability"] == "public"
                    and {d["peer"]: d["reachability"] for d in s["dialbacks"]}.get(a_peer) == "private"
                    and {d["peer"]: d["reachability"] for d in s["dialbacks"]}.get(b_peer) == "private"
                ),
            )
            assert set(r_status["relay_service"]["reservations"]) >= {a_peer, b_peer}
            circuit = f"{relay_address}/p2p-circuit/p2p/{a_peer}"
            assert a_status["listen_addresses"][0] == circuit  # private: the circuit comes first

            # A shares a database; B joins through the relay and bootstraps.
            created = a.command("create notes")
            db = created["db"]
            assert f"p2p:{circuit}" in created["ticket"]
            for i in range(50):
                a.command(f"set {db} k{i} value {i}")
            started = time.monotonic()
            assert b.command(f"join {created['ticket']}")["db"] == db
            # A pushes to B, and dials it again after the relay restarts: A's own choice
            # (B only read a public database, so otherwise only B's open connection is used).
            a.command(f"relate {db} {b.command('info')['device_id']}")
            print(f"\njoin through the relay (bootstrap of 51 entries): {time.monotonic() - started:.2f} s")
            assert b.command(f"get {db} k49")["value"] == "value 49"
            b_peer_view = _peer(b.status(), a_peer)
            assert b_peer_view is not None and b_peer_view["kind"] in ("relayed", "direct")

            # Hole punching: A accepted the relayed connection, so A starts DCUtR; report it.
            if hole_punching:
                a_status = a.wait_status(
                    "a hole-punching outcome", lambda s: any(h["peer"] == b_peer for h in s["hole_punches"])
                )
                punch = next(h for h in a_status["hole_punches"] if h["peer"] == b_peer)
                print(
                    f"hole punching A<->B: {'succeeded' if punch['succeeded'] else 'failed'} "
                    f"in {punch['duration_s']:.2f} s (A's connection to B: {_peer(a_status, b_peer)})"
                )
                # Either way the outcome is consistent with the connection, and sync goes on over it.
                expected = "direct" if punch["succeeded"] else "relayed"
                assert _peer(a_status, b_peer)["kind"] == expected  # type: ignore[index]
            else:
                assert b_peer_view["kind"] == "relayed"
                assert not a.status()["hole_punches"]

            # Each side commits; the other sees it (sync on commit, over whatever connection is up).
            a.command(f"set {db} from_a hello b")
            print(f"A -> B commit: {b.wait_value(db, 'from_a', 'hello b'):.2f} s")
            b.command(f"set {db} from_b hello a")
            print(f"B -> A commit: {a.wait_value(db, 'from_b', 'hello a'):.2f} s")

            # R restarts (same key and port): A and B reserve again and sync resumes.
            relay.stop()
            a.wait_status("A lost its reservation", lambda s: not _reserved(s))
            relay = NsNode(topo, "r", tmp_path / "r", "--relay-service", "--relay-ttl", "20")
            nodes.append(relay)
            started = time.monotonic()
            a.wait_status("A reserved again", _reserved)
            b.wait_status("B reserved again", _reserved)
            print(f"re-reserved after the relay restart in {time.monotonic() - started:.2f} s")
            a.command(f"set {db} after_restart from a")
            print(f"A -> B commit after the restart: {b.wait_value(db, 'after_restart', 'from a'):.2f} s")
            b.command(f"set {db} after_restart_b from b")
            print(f"B -> A commit after the restart: {a.wait_value(db, 'after_restart_b', 'from b'):.2f} s")
            if not hole_punching:
                assert _peer(b.status(), a_peer)["kind"] == "relayed"  # type: ignore[index]
        finally:
            for node in nodes:
                node.stop()
