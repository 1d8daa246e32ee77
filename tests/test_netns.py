"""The NAT test harness (scripts/netns.py) behaves like two home NATs and a public relay.

Everything is proved with real sockets: small Python clients and servers (``_agent`` below,
run with ``python -c``) inside the namespaces, each bounded by socket timeouts and a deadline.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.netns import NatTopology, NetnsError, cleanup_stale
from tests.conftest import require_netns

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERVE_PORTS = (7000, 7001, 7002)  # R's observed-address servers (TCP and UDP on each)
LISTEN_PORT = 7100  # a listener in A
PUNCH_PORT = {"a": 40001, "b": 40002}


def _agent(argv: list[str]) -> None:
    """Runs inside a namespace; prints one JSON object per result line. Every wait is bounded.

    serve SECONDS PORT...          TCP+UDP on each port; answers each client with "IP PORT" it saw
    tcp HOST PORT TIMEOUT [SRC]    connect (from source port SRC), print the server's answer
    udp TIMEOUT SRC HOST:PORT...   from one socket bound to SRC, ask each server what it saw
    listen PORT SECONDS            TCP listener that greets and reports each peer
    punch SRC HOST PORT TIMEOUT    TCP connect from SRC without waiting for it, print {"sent"},
                                   then wait for the connection and swap greetings over it
    """
    import errno
    import json
    import select
    import selectors
    import socket
    import time

    def out(**fields: object) -> None:
        print(json.dumps(fields), flush=True)

    def failure(exc: BaseException) -> None:
        out(ok=False, error=type(exc).__name__, errno=getattr(exc, "errno", None), detail=str(exc))

    def bound_tcp(src: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", src))
        return sock

    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        deadline = time.monotonic() + float(args[0])
        sel = selectors.DefaultSelector()
        for port in map(int, args[1:]):
            listener = bound_tcp(port)
            listener.listen(16)
            sel.register(listener, selectors.EVENT_READ, "tcp")
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("0.0.0.0", port))
            sel.register(udp, selectors.EVENT_READ, "udp")
        out(ready=True)
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "tcp":
                    conn, peer = sock.accept()
                    with conn:
                        conn.settimeout(2)
                        conn.sendall(f"{peer[0]} {peer[1]}".encode())
                else:
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(f"{peer[0]} {peer[1]}".encode(), peer)
    elif cmd == "tcp":
        host, port, timeout = args[0], int(args[1]), float(args[2])
        sock = bound_tcp(int(args[3]) if len(args) > 3 else 0)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            reply = sock.recv(2048).decode()
            out(ok=True, reply=reply, local=list(sock.getsockname()))
        except OSError as exc:
            failure(exc)
        finally:
            sock.close()
    elif cmd == "udp":
        timeout, src = float(args[0]), int(args[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("0.0.0.0", src))
            udp.settimeout(timeout)
            replies = []
            for target in args[2:]:
                host, dport = target.rsplit(":", 1)
                udp.sendto(b"?", (host, int(dport)))
                try:
                    replies.append(udp.recvfrom(2048)[0].decode())
                except OSError as exc:
                    replies.append(f"error {type(exc).__name__}")
            out(ok=True, replies=replies, local=list(udp.getsockname()))
    elif cmd == "listen":
        deadline = time.monotonic() + float(args[1])
        listener = bound_tcp(int(args[0]))
        listener.listen(16)
        out(ready=True)
        while (left := deadline - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                break
            with conn:
                conn.sendall(b"hello from the listener")
            out(accepted=list(peer))
    elif cmd == "punch":
        src, host, port, timeout = int(args[0]), args[1], int(args[2]), float(args[3])
        sock = bound_tcp(src)
        sock.setblocking(False)
        code = sock.connect_ex((host, port))  # sends the SYN now
        if code not in (0, errno.EINPROGRESS):
            failure(OSError(code, errno.errorcode.get(code, "?")))
            return
        out(sent=True)
        try:
            _, writable, _ = select.select([], [sock], [], timeout)
            if not writable:
                raise TimeoutError("connect timed out")
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, errno.errorcode.get(code, "?"))
            sock.settimeout(timeout)
            sock.sendall(f"hello from {sock.getsockname()[0]}".encode())
            reply = sock.recv(2048).decode()
            out(ok=True, reply=reply, peer=list(sock.getpeername()))
        except OSError as exc:
            failure(exc)
        finally:
            sock.close()
    else:
        raise SystemExit(f"unknown agent command {cmd!r}")


AGENT = "import sys\n" + textwrap.dedent(inspect.getsource(_agent)) + "\n_agent(sys.argv[1:])\n"


def agent(topo: NatTopology, node: str, *args: object, timeout: float = 10.0) -> dict[str, Any]:
    """Run one agent command in ``node`` to completion; its (single) JSON result."""
    done = topo.python(node, AGENT, *map(str, args), timeout=timeout)
    assert done.returncode == 0, f"agent {args} in {node} exited {done.returncode}: {done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def start_agent(topo: NatTopology, node: str, *args: object) -> subprocess.Popen[bytes]:
    """Start a long-running agent command in ``node`` and wait for its first line."""
    proc: subprocess.Popen[bytes] = topo.run(
        node, [sys.executable, "-c", AGENT, *map(str, args)], stdout=subprocess.PIPE, bufsize=0
    )
    first = read_line(proc, timeout=5.0)
    assert first.get("ready") or first.get("sent"), first
    return proc


_pending: dict[int, bytes] = {}  # pid -> output read but not yet returned


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The next JSON line ``proc`` prints, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = _pending.pop(proc.pid, b"")
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no line from {proc.args!r} in {timeout}s"
        chunk = os.read(fd, 65536)
        assert chunk, f"{proc.args!r} exited ({proc.poll()}) without a line; got {buffer!r}"
        buffer += chunk
    line, _, _pending[proc.pid] = buffer.partition(b"\n")
    result: dict[str, Any] = json.loads(line)
    return result


def has_output(proc: subprocess.Popen[bytes], wait: float) -> bool:
    assert proc.stdout is not None
    return bool(_pending.get(proc.pid)) or bool(select.select([proc.stdout.fileno()], [], [], wait)[0])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=5)


def netns_list() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def topo() -> Iterator[NatTopology]:
    require_netns()
    cleanup_stale()
    with NatTopology() as topology:  # masquerade, unsolicited inbound dropped
        server = start_agent(topology, "r", "serve", 60, *SERVE_PORTS)
        yield topology
        stop(server)
    assert not set(topology.ns.values()) & set(netns_list())  # no namespace left behind


def test_lan_hosts_reach_the_relay_through_their_nat(topo: NatTopology) -> None:
    r = topo.addr["r"]
    for host, gateway in (("a", "g1"), ("b", "g2")):
        tcp = agent(topo, host, "tcp", r, SERVE_PORTS[0], 3)
        assert tcp["ok"], (host, tcp, topo.describe())
        seen_ip, seen_port = tcp["reply"].split()
        assert seen_ip == topo.addr[gateway] == topo.public_addr(host)  # masqueraded to G's public address
        assert seen_ip != topo.addr[host]
        assert int(seen_port) == tcp["local"][1]  # ...keeping the source port (it was free)
        udp = agent(topo, host, "udp", 3, 0, f"{r}:{SERVE_PORTS[0]}")
        assert udp["replies"][0].split()[0] == topo.addr[gateway], udp  # UDP out, and the answer back in


def test_lan_addresses_are_unreachable_from_outside(topo: NatTopology) -> None:
    for src, dst in (("a", "b"), ("b", "a"), ("r", "a"), ("r", "b")):
        result = agent(topo, src, "tcp", topo.addr[dst], LISTEN_PORT, 1)
        # nobody routes 10.201.x.0/24 across: R has no route, a gateway answers ICMP net unreachable
        assert result["errno"] == errno.ENETUNREACH, (src, dst, result)
    udp = agent(topo, "a", "udp", 0.5, 0, f"{topo.addr['b']}:{LISTEN_PORT}")
    assert udp["replies"][0].startswith("error"), udp


def test_unsolicited_inbound_to_the_nat_is_dropped(topo: NatTopology) -> None:
    listener = start_agent(topo, "a", "listen", LISTEN_PORT, 30)
    try:
        # control: A really listens (its gateway reaches it on the LAN)
        inside = agent(topo, "g1", "tcp", topo.addr["a"], LISTEN_PORT, 2)
        assert inside["ok"] and inside["reply"] == "hello from the listener", inside
        for src in ("r", "b"):  # the relay, and B through its own NAT
            result = agent(topo, src, "tcp", topo.addr["g1"], LISTEN_PORT, 1)
            assert not result["ok"] and result["error"] == "TimeoutError", (src, result)  # silently dropped
        # even with a route to LAN 1 the forward chain drops what nobody asked for
        route = ["ip", "route", "add", "10.201.1.0/24", "via", topo.addr["g1"]]
        topo.exec("r", route, check=True)
        try:
            result = agent(topo, "r", "tcp", topo.addr["a"], LISTEN_PORT, 1)
            assert not result["ok"] and result["error"] == "TimeoutError", result
        finally:
            topo.exec("r", ["ip", "route", "del", *route[3:]], check=True)
        assert read_line(listener, timeout=1)["accepted"][0] == topo.lan_addr["g1"]  # and nothing else got in
        assert not has_output(listener, wait=0.2)
    finally:
        stop(listener)


def test_masquerade_mapping_is_endpoint_independent(topo: NatTopology) -> None:
    targets = [f"{topo.addr['r']}:{port}" for port in SERVE_PORTS]
    result = agent(topo, "a", "udp", 2, 45000, *targets)
    seen = set(result["replies"])
    assert seen == {f"{topo.addr['g1']} 45000"}, result  # one mapping, the source port kept


def tcp_hole_punch(topo: NatTopology, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """A and B learn their public TCP endpoints from R, then dial each other's (A first)."""
    public = {}
    for host in ("a", "b"):
        seen = agent(topo, host, "tcp", topo.addr["r"], SERVE_PORTS[1], 3, PUNCH_PORT[host])
        assert seen["ok"], seen
        public[host] = seen["reply"].split()
    a = start_agent(topo, "a", "punch", PUNCH_PORT["a"], *public["b"], timeout)  # A's SYN is out
    try:
        b = agent(topo, "b", "punch", PUNCH_PORT["b"], *public["a"], timeout, timeout=timeout + 5)
        return read_line(a, timeout=timeout + 2), b
    finally:
        stop(a)


def test_tcp_hole_punch_succeeds_through_dropping_nats(topo: NatTopology) -> None:
    a, b = tcp_hole_punch(topo, timeout=3)
    assert a["ok"] and b["ok"], (a, b, topo.describe())
    assert a["reply"] == f"hello from {topo.addr['b']}" and b["reply"] == f"hello from {topo.addr['a']}"
    assert a["peer"] == [topo.addr["g2"], PUNCH_PORT["b"]] and b["peer"] == [topo.addr["g1"], PUNCH_PORT["a"]]


def test_tcp_hole_punch_fails_when_the_nat_answers_with_rst() -> None:
    require_netns()
    with NatTopology(rst_unsolicited=True) as topo:
        server = start_agent(topo, "r", "serve", 30, *SERVE_PORTS)
        unsolicited = agent(topo, "r", "tcp", topo.addr["g1"], LISTEN_PORT, 2)
        assert unsolicited["error"] == "ConnectionRefusedError", unsolicited
        a, b = tcp_hole_punch(topo, timeout=1.5)
        assert a["error"] == "ConnectionRefusedError", a  # G2 reset A's SYN, so G1 forgot the flow
        assert not b["ok"], b
        stop(server)


def test_without_a_filter_the_gateway_resets_and_routes_unsolicited_traffic() -> None:
    require_netns()
    with NatTopology(drop_unsolicited=False) as topo:
        start_agent(topo, "a", "listen", LISTEN_PORT, 30)  # killed by close()
        to_gateway = agent(topo, "r", "tcp", topo.addr["g1"], LISTEN_PORT, 2)
        assert to_gateway["error"] == "ConnectionRefusedError", to_gateway  # G1's own TCP stack: no mapping
        topo.exec("r", ["ip", "route", "add", "10.201.1.0/24", "via", topo.addr["g1"]], check=True)
        routed = agent(topo, "r", "tcp", topo.addr["a"], LISTEN_PORT, 2)
        assert routed["ok"], routed  # a router without a firewall


def test_symmetric_nat_maps_each_destination_to_its_own_port() -> None:
    require_netns()
    with NatTopology(nat={"g1": "symmetric", "g2": "masquerade"}) as topo:
        start_agent(topo, "r", "serve", 30, *SERVE_PORTS)  # killed by close()
        targets = [f"{topo.addr['r']}:{port}" for port in SERVE_PORTS]
        a = agent(topo, "a", "udp", 2, 45000, *targets)
        assert all(reply.startswith(topo.addr["g1"]) for reply in a["replies"]), a
        assert len({reply.split()[1] for reply in a["replies"]}) > 1, a  # 3 random ports: all equal ~ 1e-9
        b = agent(topo, "b", "udp", 2, 45000, *targets)
        assert set(b["replies"]) == {f"{topo.addr['g2']} 45000"}, b


def test_cleanup_removes_everything_even_after_an_exception() -> None:
    require_netns()
    topo = NatTopology()
    with pytest.raises(RuntimeError, match="boom"), topo:
        sleeper = topo.run("b", ["sleep", "30"])
        names = set(topo.ns.values())
        assert names <= set(netns_list())
        raise RuntimeError("boom")
    assert sleeper.poll() is not None  # killed, not left running
    assert not names & set(netns_list())
    topo.close()  # idempotent
    with pytest.raises(NetnsError, match="not built"):
        topo.run("a", ["true"])


def test_cleanup_stale_removes_the_namespaces_of_a_crashed_run() -> None:
    require_netns()
    crash = (
        "import os, subprocess\n"
        "from scripts.netns import NatTopology\n"
        "topo = NatTopology(); topo.build()\n"
        "topo.run('a', ['sleep', '30'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(' '.join(topo.ns.values()), flush=True)\n"
        "os._exit(1)\n"  # no cleanup at all
    )
    with NatTopology() as alive:  # a run in progress must survive cleanup_stale
        done = subprocess.run([sys.executable, "-c", crash], cwd=ROOT, capture_output=True, text=True, timeout=30)
        left = set(done.stdout.split())
        assert len(left) == 6 and left <= set(netns_list()), done.stderr
        removed = cleanup_stale()
        assert left <= set(removed)
        assert not left & set(netns_list())
        assert set(alive.ns.values()) <= set(netns_list())
        reached = agent(alive, "a", "tcp", alive.addr["r"], 1, 2)  # still works: R's stack refuses port 1
        assert reached["error"] == "ConnectionRefusedError", reached
