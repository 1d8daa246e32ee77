"""Addresses a peer can use (issue 12): the scope filter, ``--announce``, stored peer
addresses that go stale, and failures that name every address tried.

The scope filter is a pure function, tested over made-up interface lists; ``--announce``
and the failed join go through the real ``eidetica-node`` binary; the stale-address rules
run on the real engine with libp2p hosts on loopback.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.id import ID as PeerID

from dag import Instance, Permission
from node import render
from scripts.cli_node import NodeProcess, clean_env, cli
from sync import SyncConfig, SyncPeerInfo, enable_sync
from sync import reach as reach_module
from sync import rejoin as rejoin_module
from sync.engine import Sync
from sync.errors import AddressesFailedError
from sync.transport import Address
from tests.conftest import require_netns
from transports.addresses import Interface, advertise, dial_failure, is_bridge_interface
from transports.libp2p import Libp2pTransport

ONE_LINE = "eidetica-node: error: "


def _ifs(*pairs: tuple[str, str]) -> list[Interface]:
    return [Interface(name, ipaddress.ip_address(address)) for name, address in pairs]


def _m(*texts: str) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(t) for t in texts]


def _peer_id(address: Address) -> str:
    return address.address.rsplit("/p2p/", 1)[1]


def _s(addresses: list[multiaddr.Multiaddr]) -> list[str]:
    return [str(a) for a in addresses]


# ---- the scope filter, a pure function --------------------------------------------------------

DOCKER_HOST = _ifs(
    ("lo", "127.0.0.1"),
    ("eth0", "192.168.1.20"),
    ("docker0", "172.17.0.1"),
    ("br-3f2a9c0d1e4b", "172.18.0.1"),
    ("virbr0", "192.168.122.1"),
    ("veth1a2b3c", "169.254.7.1"),
    ("cni0", "10.88.0.1"),
    ("podman1", "10.89.0.1"),
    ("lo", "::1"),
    ("eth0", "fe80::1"),
    ("eth0", "2001:db8::20"),
)


def test_bridges_loopback_and_link_local_are_not_advertised() -> None:
    wildcard = _m("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001")
    assert _s(advertise(wildcard, DOCKER_HOST)) == ["/ip4/192.168.1.20/tcp/4001", "/ip6/2001:db8::20/tcp/4001"]


def test_announced_addresses_come_first_exactly_as_given_even_a_bridge() -> None:
    announce = _m("/dns4/node.example.org/tcp/4001", "/ip4/172.17.0.1/tcp/4001")
    out = advertise(_m("/ip4/0.0.0.0/tcp/4001"), DOCKER_HOST, announce)
    assert _s(out) == ["/dns4/node.example.org/tcp/4001", "/ip4/172.17.0.1/tcp/4001", "/ip4/192.168.1.20/tcp/4001"]


def test_a_loopback_only_machine_advertises_loopback() -> None:
    only_lo = _ifs(("lo", "127.0.0.1"), ("lo", "::1"))
    assert _s(advertise(_m("/ip4/0.0.0.0/tcp/4001"), only_lo)) == ["/ip4/127.0.0.1/tcp/4001"]
    assert _s(advertise(_m("/ip4/127.0.0.1/tcp/5"), DOCKER_HOST)) == ["/ip4/127.0.0.1/tcp/5"]  # listening there only
    # Only a bridge and loopback: loopback still, never the bridge.
    assert _s(advertise(_m("/ip4/0.0.0.0/tcp/1"), _ifs(("lo", "127.0.0.1"), ("docker0", "172.17.0.1")))) == [
        "/ip4/127.0.0.1/tcp/1"
    ]
    # Announced addresses count as something else: then loopback goes.
    assert _s(advertise(_m("/ip4/0.0.0.0/tcp/1"), only_lo, _m("/ip4/203.0.113.7/tcp/1"))) == ["/ip4/203.0.113.7/tcp/1"]


def test_explicit_listen_addresses_are_filtered_too_and_link_local_never_passes() -> None:
    listen = _m("/ip4/172.17.0.1/tcp/1", "/ip4/169.254.3.3/tcp/1", "/ip4/192.168.1.20/tcp/1")
    assert _s(advertise(listen, DOCKER_HOST)) == ["/ip4/192.168.1.20/tcp/1"]
    # An explicit bridge address and nothing else: the operator chose it, it is all there is.
    assert _s(advertise(_m("/ip4/172.17.0.1/tcp/1"), DOCKER_HOST)) == ["/ip4/172.17.0.1/tcp/1"]


def test_observed_addresses_follow_the_listen_addresses_in_scope() -> None:
    observed = _m("/ip4/203.0.113.50/tcp/4001", "/ip4/127.0.0.1/tcp/4001", "/ip4/172.17.0.1/tcp/9")
    out = advertise(_m("/ip4/0.0.0.0/tcp/4001"), DOCKER_HOST, _m("/dns4/a.example/tcp/1"), observed)
    assert _s(out) == ["/dns4/a.example/tcp/1", "/ip4/192.168.1.20/tcp/4001", "/ip4/203.0.113.50/tcp/4001"]
    # Observed counts as something else: a loopback-only listener seen from outside (a port forward).
    only_lo = _ifs(("lo", "127.0.0.1"))
    assert _s(advertise(_m("/ip4/127.0.0.1/tcp/1"), only_lo, (), observed[:1])) == ["/ip4/203.0.113.50/tcp/4001"]


def test_which_interfaces_count_as_bridges() -> None:
    for name in ("docker0", "br-0123456789ab", "veth9f", "cni0", "podman0", "virbr1", "lxdbr0", "cali12", "vmnet8"):
        assert is_bridge_interface(name), name
    for name in ("eth0", "enp3s0", "wlan0", "br0", "br-lan", "wg0", "tailscale0", "bond0"):
        assert not is_bridge_interface(name), name


def test_dial_failures_are_named_by_their_cause() -> None:
    refused = OSError("all attempts failed")
    refused.__cause__ = ExceptionGroup("all attempts", [ConnectionRefusedError(111, "Connection refused")])
    outer = RuntimeError("SwarmException: fail to open connection")
    outer.__cause__ = refused
    assert dial_failure(outer) == "connection refused"
    stranger = RuntimeError("failed to negotiate the secure protocol")
    stranger.__context__ = ValueError("`msg_bytes` is not delimited: b'HTTP/1.1 400 Bad Request'")
    assert dial_failure(stranger) == "something that is not a libp2p node answers at this address"


# ---- a machine with bridges, for real: a namespace ----------------------------------------------

BRIDGED = [("eth0", "10.77.0.5/24"), ("docker0", "172.17.0.1/16"), ("br-0123456789ab", "172.18.0.1/16")]
BRIDGED += [("virbr0", "192.168.122.1/24"), ("br0", "10.78.0.1/24")]


@contextlib.contextmanager
def _bridged_namespace() -> Iterator[str]:
    """A namespace with a LAN interface (``eth0``, plus a link-local address), Docker and
    libvirt bridges and a hand-made LAN bridge ``br0``; deleted on the way out."""
    require_netns()
    ns = f"eidE{os.getpid():08x}-bridged"
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=10)
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
        for name, address in BRIDGED:
            if name != "eth0":
                run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
            run(["ip", "-n", ns, "addr", "add", address, "dev", name])
            run(["ip", "-n", ns, "link", "set", name, "up"])
        run(["ip", "-n", ns, "addr", "add", "169.254.9.9/16", "dev", "eth0"])
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.mark.slow
def test_a_node_on_a_machine_with_bridges_advertises_only_its_lan_addresses(tmp_path: Path) -> None:
    """Before: this ticket carried 172.17.0.1, 172.18.0.1 and 192.168.122.1 as well (p2p and http)."""
    with _bridged_namespace() as ns:
        data = tmp_path / "n"
        assert cli("init", "--data-dir", str(data)).returncode == 0
        wildcard = ["--p2p-listen", "/ip4/0.0.0.0/tcp/4001", "--http-bind", "0.0.0.0:8080"]
        for announce in ([], ["--announce", "/ip4/172.17.0.1/tcp/4001"]):
            node = NodeProcess.start(data, *announce, network=wildcard, launcher=["ip", "netns", "exec", ns])
            try:
                db = node.ok("db", "create", "notes")
                parts = node.ok("share", db).split("&")[1:]
                hosts = [p.split(":", 1)[1].split("/")[2] if "p2p:" in p else p.split(":")[1] for p in parts]
                expected = ["10.77.0.5", "10.78.0.1", "10.77.0.5", "10.78.0.1"]  # p2p, then http
                assert hosts == (["172.17.0.1"] if announce else []) + expected, parts
            finally:
                node.stop()


# ---- --announce through the real binary ---------------------------------------------------------


def _p2p_addresses(ticket: str) -> list[str]:
    return [part[len("pr=p2p:") :] for part in ticket.split("&") if part.startswith("pr=p2p:")]


@pytest.mark.slow
def test_announce_by_flag_environment_and_config_goes_first_in_tickets(tmp_path: Path) -> None:
    data = tmp_path / "n"
    assert cli("init", "--data-dir", str(data)).returncode == 0
    (data / "config.toml").write_text('[p2p]\nannounce = ["/dns4/from-file.example/tcp/4001"]\n')
    forms: list[tuple[tuple[str, ...], dict[str, str], list[str]]] = [
        ((), {}, ["/dns4/from-file.example/tcp/4001"]),
        (
            (),
            {"EIDETICA_ANNOUNCE": "/ip4/203.0.113.8/tcp/1, /ip4/203.0.113.9/tcp/2"},
            ["/ip4/203.0.113.8/tcp/1", "/ip4/203.0.113.9/tcp/2"],
        ),
        (
            ("--announce", "/ip4/198.51.100.7/tcp/4001", "--announce", "/ip4/172.17.0.1/tcp/4001"),
            {},
            ["/ip4/198.51.100.7/tcp/4001", "/ip4/172.17.0.1/tcp/4001"],
        ),
    ]
    db: str | None = None
    for flags, env, expected in forms:
        node = NodeProcess.start(data, "--no-http", "--p2p-listen", "/ip4/0.0.0.0/tcp/0", *flags, env=clean_env(**env))
        try:
            db = db or node.ok("db", "create", "notes")
            addresses = _p2p_addresses(node.ok("share", db))
            peer = node.ready["addresses"][-1].rsplit("/p2p/", 1)[1]
            assert addresses[: len(expected)] == [f"{a}/p2p/{peer}" for a in expected], addresses
            # Then the listen addresses in scope: with an announced address, loopback is not one.
            rest = addresses[len(expected) :]
            assert rest and not any(a.startswith("/ip4/127.") for a in rest), addresses
        finally:
            node.stop()


@pytest.mark.parametrize(
    ("args", "env", "config", "fragment"),
    [
        (["--announce", "/ip4/1.2.3.999/tcp/1"], {}, None, "--announce must be multiaddrs like"),
        ([], {"EIDETICA_ANNOUNCE": "/ip4/1.2.3.4/tcp/1,nonsense"}, None, "environment variable EIDETICA_ANNOUNCE"),
        ([], {}, "[p2p]\nannounce = ['/tcp/x']\n", "config.toml: p2p.announce must be multiaddrs"),
        ([], {}, "[p2p]\nannounce = 3\n", "config.toml: p2p.announce must be a list of strings, not 3"),
    ],
)
def test_a_bad_announce_address_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str | None, fragment: str
) -> None:
    if config is not None:
        tmp_path.joinpath("config.toml").write_text(config)
    result = cli("run", "--data-dir", str(tmp_path), *args, env=clean_env(**env))
    assert result.returncode == 2, result
    assert result.stderr.startswith(ONE_LINE) and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


# ---- a failed join names every address -----------------------------------------------------------


@pytest.mark.slow
def test_a_join_whose_addresses_all_fail_names_each_with_its_own_error(tmp_path: Path) -> None:
    one = NodeProcess.start(tmp_path / "one", "--no-http")
    two = NodeProcess.start(tmp_path / "two")
    try:
        db = one.ok("db", "create", "notes")
        live = one.ready["addresses"][0].split(":", 1)[1]  # /ip4/127.0.0.1/tcp/P/p2p/<one>
        stranger = two.ready["addresses"][0].split(":", 1)[1].rsplit("/p2p/", 1)[0]  # two's port
        one_id = live.rsplit("/p2p/", 1)[1]
        tried = [
            f"p2p:/ip4/127.0.0.1/tcp/9/p2p/{one_id}",  # nothing listens
            f"p2p:{stranger}/p2p/{one_id}",  # another node listens there
            "http:127.0.0.1:9",
        ]
        result = two.cli("join", f"eidetica:?db={db}&" + "&".join(f"pr={a}" for a in tried))
        assert result.returncode == 1 and result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines[0] == f"{ONE_LINE}join failed: 3 addresses tried:", result.stderr
        assert [line.split(": ", 1)[0].strip() for line in lines[1:]] == tried
        assert "connection refused" in lines[1]
        assert "peer ID mismatch" in lines[2]
        assert "ConnectError" in lines[3]
        # The daemon logged each address on its own line, too.
        logged = [line for line in two.stderr().splitlines() if "INFO sync.ticket: join of" in line]
        assert len(logged) == 3 and all(a in line for a, line in zip(tried, logged, strict=True))
    finally:
        one.stop()
        two.stop()


# ---- stored addresses: dropped after failing, refreshed by a handshake ----------------------------


async def _node(stack: AsyncExitStack, label: str) -> tuple[Sync, Libp2pTransport]:
    instance = Instance.in_memory()
    sync = await stack.enter_async_context(enable_sync(instance, config=SyncConfig(display_name=label)))
    transport = Libp2pTransport(instance.device_key, listen=["/ip4/127.0.0.1/tcp/0"])
    sync.register_transport("p2p", transport)
    await sync.accept_connections()
    return sync, transport


async def test_a_failing_address_is_dropped_and_a_handshake_refreshes_the_list(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(45):
        await _failing_address_is_dropped(monkeypatch, caplog)


async def _failing_address_is_dropped(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(reach_module, "RETRY_FAILING_MS", 0)  # retried on every exchange
    monkeypatch.setattr(reach_module, "DROP_AFTER_MS", 300)
    # The test drops the connection before each exchange; a returning connection would
    # otherwise add an exchange of its own (sync/rejoin.py) and blur the count of writes.
    monkeypatch.setattr(rejoin_module, "WATCH_S", 3600.0)
    caplog.set_level(logging.INFO, logger="sync.reach")
    async with AsyncExitStack() as stack:
        server, server_p2p = await _node(stack, "server")
        client, client_p2p = await _node(stack, "client")
        db = server.instance.create_database(name="notes")
        with db.transaction() as txn:
            txn.settings().set_global(Permission.read())
        [good] = server.listen_addresses()
        peer = await client.sync_with_peer(good, db.id)
        before = len(client.state.db)
        await client.sync_now(peer, db.id)
        per_exchange = len(client.state.db) - before  # what one exchange writes to _sync
        stale = Address("p2p", f"/ip4/127.0.0.1/tcp/9/p2p/{server_p2p.peer_id}")  # a port nobody listens on
        client.state.upsert_peer(peer, addresses=[stale])  # known first, as a peer's old announcement was
        record = client.state.peer(peer)
        assert record is not None and record.addresses == (stale, good)

        before = len(client.state.db)
        for _ in range(reach_module.DROP_AFTER_FAILURES):
            await trio.sleep(0.15)
            # Over an open connection any address "works" (it is reused): dial afresh each time.
            await client_p2p.host.disconnect(PeerID.from_base58(server_p2p.peer_id))
            await client.sync_now(peer, db.id)  # the stale address fails, the good one carries it
        record = client.state.peer(peer)
        assert record is not None and record.addresses == (good,)
        assert "dropping p2p:/ip4/127.0.0.1/tcp/9" in caplog.text
        # Failures are counted in memory: the exchanges wrote what they always write, plus the
        # one record that changed; nothing per failure.
        assert len(client.state.db) - before == reach_module.DROP_AFTER_FAILURES * per_exchange + 1

        # A handshake refreshes: the peer's announcement first, a known address it no longer
        # announces kept after it (not failing), at most MAX_PEER_ADDRESSES.
        other = Address("p2p", f"/ip4/127.0.0.1/tcp/8/p2p/{server_p2p.peer_id}")
        client.state.upsert_peer(peer, addresses=[other])
        await client.connect(good)
        record = client.state.peer(peer)
        assert record is not None and record.addresses == (good, other)

        # Failing and no longer announced: the next handshake drops it.
        for _ in range(reach_module.DROP_AFTER_FAILURES):
            client.reach.failed(peer, other)
        await trio.sleep(0.35)
        await client.connect(good)
        record = client.state.peer(peer)
        assert record is not None and record.addresses == (good,)

        # The server side: the client's handshakes with it refresh its record of the client too.
        [client_address] = client.listen_addresses()
        old = Address("p2p", f"/ip4/127.0.0.1/tcp/7/p2p/{_peer_id(client_address)}")
        server.state.upsert_peer(client.device_id, addresses=[old])
        record = server.state.peer(client.device_id)
        assert record is not None and record.addresses == (old, client_address)
        await client.connect(good)
        await client.sync_now(peer, db.id)
        record = server.state.peer(client.device_id)
        assert record is not None and record.addresses == (client_address, old)


async def test_a_sync_whose_addresses_all_fail_names_each_and_history_keeps_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync.exchanges")
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            client, _ = await _node(stack, "client")
            _, other = await _node(stack, "other")  # a live node that is not the peer asked for
            ghost = Libp2pTransport(Instance.in_memory().device_key)  # only its peer ID is used
            db = client.instance.create_database(name="notes").id
            dead = [
                Address("p2p", f"/ip4/127.0.0.1/tcp/9/p2p/{ghost.peer_id}"),
                Address("p2p", other.listen_addresses()[0].rsplit("/p2p/", 1)[0] + f"/p2p/{ghost.peer_id}"),
            ]
            client.register_sync_peer(SyncPeerInfo("ed25519:ghost", db, addresses=tuple(dead)))
            with pytest.raises(AddressesFailedError) as caught:
                await client.sync_now("ed25519:ghost", db)
            last_error = client.state.cursor(db, "ed25519:ghost").last_error  # before retries in the background
    error = caught.value
    assert [a for a, _ in error.attempts] == [str(a) for a in dead]
    assert "connection refused" in error.attempts[0][1] and "peer ID mismatch" in error.attempts[1][1]
    lines = str(error).splitlines()
    assert lines[0] == f"sync of {db} with ed25519:ghost: 2 addresses tried:" and len(lines) == 3
    assert last_error == error.one_line and "\n" not in error.one_line
    assert error.one_line in caplog.text
    # The CLI's sync output: the FAILED line, then one line per address.
    rendered = render.sync({"results": [{"db": db, "peer": "ed25519:ghost", "ok": False, "error": str(error)}]})
    assert rendered[0].startswith("FAILED") and rendered[0].endswith("2 addresses tried:")
    assert [line.split(": ", 1)[0].strip() for line in rendered[1:]] == [str(a) for a in dead]
