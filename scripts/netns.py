"""Two LANs behind NAT gateways and a public relay, built from Linux network namespaces.

::

    public segment 198.18.0.0/24 (a bridge inside namespace "pub")
      R   198.18.0.1    relay, an ordinary public host
      G1  198.18.0.2    NAT gateway of LAN 1   (LAN side 10.201.1.1/24)  --  A 10.201.1.2
      G2  198.18.0.3    NAT gateway of LAN 2   (LAN side 10.201.2.1/24)  --  B 10.201.2.2

Every address lives only inside namespaces this module creates; none of them is connected to
the host's network, so nothing sent in the topology can leave it. A and B route everything
through their gateway; the gateways know only the public segment and their own LAN (no default
route), so a private address of the other LAN is unreachable and the only way in is through a
NAT mapping.

Usage (needs root, ``ip`` and ``nft``; :func:`skip_reason` says why it can't run)::

    from scripts.netns import NatTopology, cleanup_stale

    cleanup_stale()                                   # namespaces left by crashed runs
    with NatTopology(nat="masquerade", drop_unsolicited=True) as topo:
        server = topo.run("r", [sys.executable, "-m", "http.server", "8000"])   # a Popen
        url = f"http://{topo.addr['r']}:8000/"                                 # 198.18.0.1
        done = topo.python("a", f"import urllib.request as u; print(u.urlopen({url!r}).status)")
        topo.ns["a"], topo.addr["g1"], topo.public_addr("a")   # "eid-1a2b3c4d-a", "198.18.0.2", same
    # every process started through the topology is killed, every namespace deleted

The gateways' behaviour, per gateway (a value, or a dict ``{"g1": ..., "g2": ...}``):

- ``nat="masquerade"``: ``masquerade`` on the public interface. Linux keeps the source port
  when it is free ("port preservation") and a new flow from the same private address and port
  gets the same public port whatever its destination, so the mapping is endpoint-independent
  for UDP and TCP alike (unless two flows would clash on the same public 5-tuple). That is what
  makes TCP hole punching possible: the address R observed is the one the peer must dial.
  Filtering is still per remote address and port (conntrack admits only replies to a flow it
  has seen), so a punch needs both sides to send a SYN; the first SYN that reaches the other
  NAT before its own side's SYN left is dropped (or reset, see below) and the one that follows
  matches conntrack as a reply, giving a TCP simultaneous open.
- ``nat="symmetric"``: ``masquerade fully-random``: every flow gets a random public port, so
  the mapping depends on the destination and the address R observed is useless to a peer.
- ``drop_unsolicited=True`` (default): packets from the public side that belong to no known
  flow (``ct state`` not established/related) are dropped, whether addressed to the gateway or
  routed to the LAN: a typical home router. ``False``: no filter at all; note that a TCP SYN to
  the gateway's public address for which no mapping exists is then answered by the gateway's
  own TCP stack with a RST (nothing listens there), so a hole punch fails just as with:
- ``rst_unsolicited=True`` (needs ``drop_unsolicited=True``): unsolicited TCP is answered with
  a RST instead of being dropped (the NAT that breaks hole punching); other protocols dropped.

IPv6 is disabled in every namespace (the topology is IPv4 only), ``lo`` is up everywhere and
``net.ipv4.ip_forward=1`` only on the gateways. Interfaces are created directly inside their
namespaces (``ip link add ... netns X type veth peer ... netns Y``), so they never exist in the
host's namespace and disappear with the namespace; their names need be unique only there.
A run holds ``flock`` on ``/run/eidetica-netns/<suffix>.lock`` for as long as its namespaces
exist, so :func:`cleanup_stale` removes only the leftovers of processes that died.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_PREFIX",
    "GATEWAYS",
    "HOSTS",
    "LAN_IF",
    "LOCK_DIR",
    "NODES",
    "PUBLIC_IF",
    "HubTopology",
    "NatTopology",
    "NetnsError",
    "cleanup_stale",
    "gateway_ruleset",
    "skip_reason",
]

DEFAULT_PREFIX = "eid-"
LOCK_DIR = Path("/run/eidetica-netns")
NODES = ("pub", "r", "g1", "g2", "a", "b")  # "pub" is the switch of the public segment
GATEWAYS = ("g1", "g2")
HOSTS = {"a": "g1", "b": "g2"}  # LAN host -> its gateway
PUBLIC_IF = "pub0"  # in R, G1, G2: the veth to the public bridge
LAN_IF = "lan0"  # in G1/A and G2/B: the LAN veth
BRIDGE = "br0"  # in "pub"

PUBLIC_NET = ipaddress.ip_network("198.18.0.0/24")  # RFC 2544 benchmarking range
PUBLIC_ADDR = {"r": "198.18.0.1", "g1": "198.18.0.2", "g2": "198.18.0.3"}
LAN_NET = {"g1": ipaddress.ip_network("10.201.1.0/24"), "g2": ipaddress.ip_network("10.201.2.0/24")}
LAN_ADDR = {"g1": "10.201.1.1", "a": "10.201.1.2", "g2": "10.201.2.1", "b": "10.201.2.2"}

NAT_MODES = ("masquerade", "symmetric")
COMMAND_TIMEOUT = 10.0  # seconds, for every setup/teardown command
_SUFFIX_RE = "[0-9a-f]{8}"
_T = TypeVar("_T")


class NetnsError(RuntimeError):
    """A command that builds or inspects the topology failed."""


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _netns_list() -> list[str]:
    done = _run(["ip", "netns", "list"], check=False)
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    done = _run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in done.stdout.split() if tok.isdigit()]


def _kill_netns_processes(ns: str, deadline: float) -> None:
    """SIGKILL whatever still runs inside ``ns`` and wait (until ``deadline``) for it to go."""
    while True:
        pids = [pid for pid in _netns_pids(ns) if pid != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _delete_netns(names: Sequence[str]) -> list[str]:
    """Kill the processes in, then delete, each namespace; returns those that could not be deleted."""
    deadline = time.monotonic() + 3.0
    for ns in names:
        _kill_netns_processes(ns, deadline)
    failed = []
    for ns in names:
        done = _run(["ip", "netns", "delete", ns], check=False)
        if done.returncode != 0 and ns in _netns_list():
            failed.append(ns)
    return failed


class _RunLock:
    """An exclusive ``flock`` that says "the namespaces with this suffix are in use"."""

    def __init__(self, suffix: str) -> None:
        self.path = LOCK_DIR / f"{suffix}.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces ``<prefix><8 hex>-<node>`` whose run is gone; returns their names.

    A run is gone when nobody holds its lock (the process that made it died, even by SIGKILL),
    so namespaces of a run in progress elsewhere, or in this process, are left alone.
    Harmless (returns []) when not root or when ``ip`` is missing.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}({_SUFFIX_RE})-[a-z0-9]+$")
    by_suffix: dict[str, list[str]] = {}
    for ns in _netns_list():
        match = pattern.match(ns)
        if match:
            by_suffix.setdefault(match.group(1), []).append(ns)
    if LOCK_DIR.is_dir():  # lock files of runs that died before (or after) making namespaces
        for path in LOCK_DIR.glob("*.lock"):
            if re.fullmatch(_SUFFIX_RE, path.stem):
                by_suffix.setdefault(path.stem, [])
    removed: list[str] = []
    for suffix, names in sorted(by_suffix.items()):
        lock = _RunLock(suffix)
        if not lock.acquire():
            continue  # alive
        try:
            failed = _delete_netns(names)
            removed.extend(ns for ns in names if ns not in failed)
        finally:
            lock.release()
    return removed


@functools.cache
def skip_reason() -> str | None:
    """Why :class:`NatTopology` cannot be built here, or None when it can.

    Checks Linux, root, ``ip`` and ``nft`` on PATH, then really builds a throwaway namespace
    with a bridge, a veth pair and a masquerading nftables table (catches kernels or containers
    without netns, bridge, nf_tables or NAT support). The answer is cached.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root for ip netns and nftables (CI runs as root; locally: sudo)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH (apt-get install iproute2 nftables)"
    suffix = secrets.token_hex(4)
    lock = _RunLock(suffix)
    try:
        if not lock.acquire():
            return "could not take a lock in /run/eidetica-netns"
    except OSError as exc:
        return f"cannot create the lock directory {LOCK_DIR}: {exc}"
    ns = [f"{DEFAULT_PREFIX}{suffix}-probe", f"{DEFAULT_PREFIX}{suffix}-probe2"]
    try:
        for name in ns:
            _run(["ip", "netns", "add", name])
        _run(["ip", "-n", ns[0], "link", "add", "br0", "type", "bridge"])
        _run(["ip", "link", "add", "name", "v0", "netns", ns[0], "type", "veth", "peer", "name", "v1", "netns", ns[1]])
        _run(["ip", "-n", ns[0], "link", "set", "v0", "master", "br0", "up"])
        _run(
            ["ip", "netns", "exec", ns[1], "nft", "-f", "-"],
            input=gateway_ruleset(public_if="v1", nat="masquerade", drop_unsolicited=True, rst_unsolicited=True),
        )
    except NetnsError as exc:
        return f"cannot build network namespaces here: {exc}"
    finally:
        _delete_netns([name for name in ns if name in _netns_list()])
        lock.release()
    return None


def gateway_ruleset(*, public_if: str, nat: str, drop_unsolicited: bool, rst_unsolicited: bool = False) -> str:
    """The nftables script (for ``nft -f -``) of one NAT gateway; see the module docstring."""
    if nat not in NAT_MODES:
        raise ValueError(f"nat must be one of {NAT_MODES}, not {nat!r}")
    if rst_unsolicited and not drop_unsolicited:
        raise ValueError("rst_unsolicited=True needs drop_unsolicited=True")
    masquerade = "masquerade fully-random" if nat == "symmetric" else "masquerade"
    lines = [
        "table ip eid_nat {",
        "    chain prerouting { type nat hook prerouting priority dstnat; policy accept; }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f'        oifname "{public_if}" {masquerade}',
        "    }",
        "}",
    ]
    if drop_unsolicited:
        lines.append("table inet eid_filter {")
        for hook in ("input", "forward"):  # to the gateway itself, and routed towards the LAN
            lines += [
                f"    chain {hook} {{",
                f"        type filter hook {hook} priority filter; policy accept;",
                f'        iifname "{public_if}" ct state established,related accept',
            ]
            if rst_unsolicited:
                lines.append(f'        iifname "{public_if}" meta l4proto tcp reject with tcp reset')
            lines += [f'        iifname "{public_if}" drop', "    }"]
        lines.append("}")
    return "\n".join(lines) + "\n"


def _per_gateway(name: str, value: _T | Mapping[str, _T]) -> dict[str, _T]:
    if isinstance(value, Mapping):
        if set(value) != set(GATEWAYS):
            raise ValueError(f"{name} as a mapping needs exactly the keys {GATEWAYS}")
        return {gw: value[gw] for gw in GATEWAYS}
    return dict.fromkeys(GATEWAYS, value)


class NatTopology:
    """Relay R on a public segment; A behind NAT gateway G1, B behind NAT gateway G2.

    Attributes (after ``__enter__``/:meth:`build`):

    - ``ns[node]``: namespace name for node in ``NODES`` ("pub", "r", "g1", "g2", "a", "b")
    - ``addr[node]``: the node's IPv4 address; for a gateway its public one (``lan_addr`` has
      the LAN side); "pub" has none
    - ``lan_addr[gw]``, ``public_if``/``lan_if`` (interface names), ``nat``,
      ``drop_unsolicited``, ``rst_unsolicited`` (dicts per gateway), ``suffix``.
    """

    def __init__(
        self,
        *,
        nat: str | Mapping[str, str] = "masquerade",
        drop_unsolicited: bool | Mapping[str, bool] = True,
        rst_unsolicited: bool | Mapping[str, bool] = False,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.nat = _per_gateway("nat", nat)
        self.drop_unsolicited = _per_gateway("drop_unsolicited", drop_unsolicited)
        self.rst_unsolicited = _per_gateway("rst_unsolicited", rst_unsolicited)
        self.rulesets = {
            gw: gateway_ruleset(
                public_if=PUBLIC_IF,
                nat=self.nat[gw],
                drop_unsolicited=self.drop_unsolicited[gw],
                rst_unsolicited=self.rst_unsolicited[gw],
            )
            for gw in GATEWAYS
        }  # validates the options before anything is built
        self.suffix = secrets.token_hex(4)
        self.ns = {node: f"{prefix}{self.suffix}-{node}" for node in NODES}
        self.addr = {"r": PUBLIC_ADDR["r"], "g1": PUBLIC_ADDR["g1"], "g2": PUBLIC_ADDR["g2"]}
        self.addr |= {"a": LAN_ADDR["a"], "b": LAN_ADDR["b"]}
        self.lan_addr = {gw: LAN_ADDR[gw] for gw in GATEWAYS}
        self.public_if = PUBLIC_IF
        self.lan_if = LAN_IF
        self._lock = _RunLock(self.suffix)
        self._created: list[str] = []  # namespaces that exist and are ours
        self._procs: list[subprocess.Popen[Any]] = []
        self._group_leaders: set[int] = set()  # pids started in a session of their own: signal the group
        self._built = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> NatTopology:
        self.build()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except NetnsError as cleanup_error:
            if exc is None:
                raise
            print(
                f"scripts.netns: cleanup after {exc_type.__name__ if exc_type else 'error'} failed: {cleanup_error}",
                file=sys.stderr,
            )

    def build(self) -> None:
        """Create everything; on any failure (or Ctrl-C) tear down what exists and re-raise."""
        if self._built:
            raise NetnsError("this topology was already built; make a new NatTopology")
        self._built = True
        if not self._lock.acquire():
            raise NetnsError(f"lock {self._lock.path} is held by another run")
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        ns = self.ns
        for node in NODES:
            _run(["ip", "netns", "add", ns[node]])
            self._created.append(ns[node])
            _run(["ip", "-n", ns[node], "link", "set", "lo", "up"])
            sysctls = {"net/ipv6/conf/all/disable_ipv6": 1, "net/ipv6/conf/default/disable_ipv6": 1}
            if node in GATEWAYS:
                sysctls["net/ipv4/ip_forward"] = 1
            self._sysctl(node, sysctls)
        # the public segment: a bridge in "pub", a veth from it to each of R, G1, G2
        _run(["ip", "-n", ns["pub"], "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", ns["pub"], "link", "set", BRIDGE, "up"])
        for node in ("r", *GATEWAYS):
            port = f"to-{node}"
            self._veth("pub", port, node, PUBLIC_IF)
            _run(["ip", "-n", ns["pub"], "link", "set", port, "master", BRIDGE, "up"])
            self._address(node, PUBLIC_IF, PUBLIC_ADDR[node], PUBLIC_NET.prefixlen)
        # the LANs
        for host, gw in HOSTS.items():
            self._veth(gw, LAN_IF, host, LAN_IF)
            self._address(gw, LAN_IF, LAN_ADDR[gw], LAN_NET[gw].prefixlen)
            self._address(host, LAN_IF, LAN_ADDR[host], LAN_NET[gw].prefixlen)
            _run(["ip", "-n", ns[host], "route", "add", "default", "via", LAN_ADDR[gw]])
        for gw in GATEWAYS:
            _run(["ip", "netns", "exec", ns[gw], "nft", "-f", "-"], input=self.rulesets[gw])

    def _sysctl(self, node: str, values: Mapping[str, int]) -> None:
        script = "; ".join(
            f"if [ -e /proc/sys/{key} ]; then echo {val} > /proc/sys/{key}; fi" for key, val in values.items()
        )
        _run(["ip", "netns", "exec", self.ns[node], "sh", "-ec", script])

    def _veth(self, node1: str, if1: str, node2: str, if2: str) -> None:
        # made directly inside both namespaces: never visible in (or colliding in) the host's
        peer = ["peer", "name", if2, "netns", self.ns[node2]]
        _run(["ip", "link", "add", "name", if1, "netns", self.ns[node1], "type", "veth", *peer])

    def _address(self, node: str, ifname: str, address: str, prefixlen: int) -> None:
        _run(["ip", "-n", self.ns[node], "addr", "add", f"{address}/{prefixlen}", "dev", ifname])
        _run(["ip", "-n", self.ns[node], "link", "set", ifname, "up"])

    def close(self) -> None:
        """Kill every process started here, delete every namespace made here. Idempotent."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
        self._group_leaders.clear()
        # anything else in our namespaces (grandchildren in other sessions, exec leftovers)
        failed = _delete_netns(self._created)
        self._created = failed
        if not failed:
            self._lock.release()
            atexit.unregister(self.close)
        else:
            raise NetnsError(f"could not delete network namespaces {failed}")

    def _signal(self, proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.pid in self._group_leaders:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    # -- running things inside ---------------------------------------------------------------

    def _argv(self, node: str, argv: Sequence[str]) -> list[str]:
        if node not in self.ns:
            raise KeyError(f"unknown node {node!r}; nodes are {NODES}")
        if not self._created:
            raise NetnsError("the topology is not built (use `with NatTopology() as topo:`)")
        return ["ip", "netns", "exec", self.ns[node], *argv]

    def run(self, node: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``node``'s namespace; killed (with its process group) on close.

        Defaults: ``stdin=DEVNULL``, ``start_new_session=True``; any Popen keyword overrides.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(node, argv), **popen_kwargs)
        if popen_kwargs["start_new_session"]:
            self._group_leaders.add(proc.pid)
        self._procs.append(proc)
        return proc

    def exec(
        self, node: str, argv: Sequence[str], *, timeout: float = 10.0, check: bool = False, **run_kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``node``'s namespace to completion; text output captured.

        Raises ``subprocess.TimeoutExpired`` (after killing it) past ``timeout`` seconds and
        ``CalledProcessError`` on a non-zero exit when ``check``.
        """
        if "input" not in run_kwargs:
            run_kwargs.setdefault("stdin", subprocess.DEVNULL)
        run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("text", True)
        return subprocess.run(self._argv(node, argv), timeout=timeout, check=check, **run_kwargs)

    def python(self, node: str, code: str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """``exec(node, [sys.executable, "-c", code, *args])``."""
        return self.exec(node, [sys.executable, "-c", code, *args], timeout=timeout)

    # -- facts ---------------------------------------------------------------------------------

    def gateway_of(self, node: str) -> str | None:
        """ "g1" for "a", "g2" for "b", None for the public nodes."""
        return HOSTS.get(node)

    def public_addr(self, node: str) -> str:
        """The source address the public segment sees for ``node`` (its gateway's for A and B)."""
        return self.addr[HOSTS.get(node, node)]

    def ruleset(self, node: str) -> str:
        """``nft list ruleset`` inside ``node`` (for failure messages)."""
        return _run(["ip", "netns", "exec", self.ns[node], "nft", "list", "ruleset"]).stdout

    def describe(self) -> str:
        """Addresses, routes and gateway rulesets, for failure messages."""
        lines = []
        for node in NODES:
            addrs = _run(["ip", "-n", self.ns[node], "-br", "addr"], check=False).stdout.strip()
            routes = _run(["ip", "-n", self.ns[node], "route"], check=False).stdout.strip()
            lines += [f"== {node} ({self.ns[node]})", addrs, routes]
        for gw in GATEWAYS:
            lines += [f"== nft {gw}", self.ruleset(gw)]
        return "\n".join(lines)


HUB_NET = "10.203.{}.0/24"  # spoke i (from 1) of a HubTopology; the hub is .1, the spoke .2


class HubTopology(NatTopology):
    """A hub namespace with one point-to-point link to each spoke; the hub forwards nothing.

    ::

        spoke 1  10.203.1.2 --- 10.203.1.1  hub  10.203.2.1 --- 10.203.2.2  spoke 2  ...

    Each spoke's default route goes to the hub, so a spoke reaches every address *of the
    hub* (Linux answers for any of its own addresses on any interface), but never another
    spoke: the hub's nftables forward chain rejects every packet (TCP with a reset, the rest
    with ICMP "host unreachable"), so a dial fails at once instead of timing out. A process
    on the hub (a relay) is then the only way between spokes: how "A is reachable only
    through that relay" is tested without leaving the machine. No NAT.

    Lifecycle, locking, ``run``/``exec``/``python`` and cleanup are :class:`NatTopology`'s;
    ``ns``, ``addr`` (a spoke's own address), ``hub_addr[spoke]`` (the hub's address on
    that spoke's link) and :meth:`describe` are this topology's.
    """

    RULESET = (
        "table inet eid_hub {\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy drop;\n"
        "        meta l4proto tcp reject with tcp reset\n"
        "        reject with icmpx type host-unreachable\n"
        "    }\n"
        "}\n"
    )

    def __init__(self, spokes: Sequence[str] = ("a", "b"), *, hub: str = "r", prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(prefix=prefix)
        if hub in spokes or len(set(spokes)) != len(spokes) or not spokes:
            raise ValueError(f"spokes {spokes!r} must be distinct, non-empty and not the hub {hub!r}")
        self.hub = hub
        self.spokes = tuple(spokes)
        self.ns = {node: f"{prefix}{self.suffix}-{node}" for node in (hub, *self.spokes)}
        nets = {spoke: ipaddress.ip_network(HUB_NET.format(i)) for i, spoke in enumerate(self.spokes, 1)}
        self.addr = {spoke: str(net[2]) for spoke, net in nets.items()}
        self.hub_addr = {spoke: str(net[1]) for spoke, net in nets.items()}

    def __enter__(self) -> HubTopology:
        self.build()
        return self

    def _build(self) -> None:
        disable_ipv6 = {"net/ipv6/conf/all/disable_ipv6": 1, "net/ipv6/conf/default/disable_ipv6": 1}
        for node, ns in self.ns.items():
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._sysctl(node, {**disable_ipv6, "net/ipv4/ip_forward": int(node == self.hub)})
        for spoke in self.spokes:
            self._veth(self.hub, f"to-{spoke}", spoke, LAN_IF)
            self._address(self.hub, f"to-{spoke}", self.hub_addr[spoke], 24)
            self._address(spoke, LAN_IF, self.addr[spoke], 24)
            _run(["ip", "-n", self.ns[spoke], "route", "add", "default", "via", self.hub_addr[spoke]])
        # forwarding is on so that what is not for the hub reaches the forward chain and is rejected there
        _run(["ip", "netns", "exec", self.ns[self.hub], "nft", "-f", "-"], input=self.RULESET)

    def describe(self) -> str:
        """Addresses and routes of every namespace, for failure messages."""
        lines = []
        for node, ns in self.ns.items():
            addrs = _run(["ip", "-n", ns, "-br", "addr"], check=False).stdout.strip()
            routes = _run(["ip", "-n", ns, "route"], check=False).stdout.strip()
            lines += [f"== {node} ({ns})", addrs, routes]
        return "\n".join(lines)
