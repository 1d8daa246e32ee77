"""Reachability from any libp2p peer: the observed-address table, AutoNAT v1 (answered and
asked, trusted only from a fresh connection), inference from a working reservation, the
combiner of all three, and the back-off between checks. Real hosts on loopback."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import multiaddr
import pytest
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from dag import SigningKey
from scripts.netns import NatTopology, cleanup_stale
from sync.messages import Message
from sync.transport import RequestContext
from tests.conftest import require_netns
from tests.ns_agent import PORT, NsNode
from tests.waiting import until
from transports.autonat import AUTONAT_PROTOCOL, InboundWatch, ask_autonat
from transports.libp2p import Libp2pTransport, new_noise_host
from transports.observed import ObservedAddresses, observer_group, thin_waist
from transports.reachability import (
    DialbackOutcome,
    ProtocolMissing,
    ReachabilityMonitor,
    combine,
    dialback_outcome,
    open_quietly,
)
from transports.relay import dial_exactly

TIMEOUT_S = 30
PREFIX = "eidd-"  # this file's namespaces (parallel runs of other files use their own)


async def _no_requests(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
    return
    yield  # these nodes serve no sync requests


@asynccontextmanager
async def serving(key: SigningKey, **options: Any) -> AsyncIterator[Libp2pTransport]:
    """A libp2p transport listening on a free loopback port, with ``options``."""
    transport = Libp2pTransport(key, listen=["/ip4/127.0.0.1/tcp/0"], hole_punching=False, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        await nursery.start(transport.serve, _no_requests)
        yield transport
        nursery.cancel_scope.cancel()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_observed_address_is_confirmed_by_distinct_observer_groups_and_expires() -> None:
    clock = _Clock()
    table = ObservedAddresses(min_observers=2, ttl_s=60, clock=clock)
    with_peer = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWHb268K4S2neqdwWwsPuF9EGhdhdfogMogcEJrLcpSgXv"
    assert table.record(with_peer, observer_ip="198.51.100.1")  # kept as IP and port only
    # Many keys on one machine are one observer; the same IPv6 /56 is one observer too.
    for n in range(5):
        table.record("/ip4/203.0.113.7/tcp/4001", observer_ip="198.51.100.1", observer=f"peer{n}")
    assert table.confirmed() == []
    assert observer_group("2001:db8:0:1::1") == observer_group("2001:db8:0:2::9")
    table.record("/ip4/203.0.113.7/tcp/4001", observer_ip="198.51.100.2")
    assert table.confirmed() == ["/ip4/203.0.113.7/tcp/4001"]
    assert table.snapshot()[0].observers == 2
    clock.now += 61
    assert table.confirmed() == [] and table.snapshot() == ()
    assert table.reports == 7  # a counter, not a history


def test_the_observed_table_is_bounded_and_refuses_what_is_not_an_address() -> None:
    clock = _Clock()
    table = ObservedAddresses(max_addresses=4, clock=clock)
    for n in range(50):
        clock.now += 1
        assert table.record(f"/ip4/203.0.113.{n}/tcp/4001", observer_ip=f"198.51.100.{n % 7}")
    assert len(table.snapshot()) == 4
    assert {r.address for r in table.snapshot()} == {f"/ip4/203.0.113.{n}/tcp/4001" for n in range(46, 50)}
    for n in range(40):  # one address, many observers: the per-address table stays bounded too
        table.record("/ip4/203.0.113.49/tcp/4001", observer_ip=f"192.0.2.{n}")
    assert table.snapshot()[0].observers == 16
    for bad in ("/dns4/example.com/tcp/1", "/ip4/1.2.3.4/tcp/1/p2p-circuit", "garbage", "/ip4/1.2.3.4"):
        assert thin_waist(bad) is None
        assert not table.record(bad, observer_ip="192.0.2.1")
    assert not table.record("/ip4/1.2.3.4/tcp/1", observer_ip=None)  # no observer at all


def test_seen_at_names_only_our_own_non_loopback_addresses() -> None:
    table = ObservedAddresses()
    table.record("/ip4/127.0.0.1/tcp/5555", observer_ip="127.0.0.1")
    table.record("/ip4/203.0.113.7/tcp/6000", observer_ip="198.51.100.1")  # our NAT's outside
    own = ["/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.5/tcp/4001"]
    assert table.seen_at(own) == []
    table.record("/ip4/192.168.1.5/tcp/7000", observer_ip="192.168.1.9")  # a LAN peer, no NAT between
    assert table.seen_at(own) == ["/ip4/192.168.1.5/tcp/7000"]


async def test_identify_feeds_the_observed_table_of_both_ends() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(serving(SigningKey.generate()))
            b = await stack.enter_async_context(serving(SigningKey.generate()))
            await dial_exactly(b.host, info_from_p2p_addr(multiaddr.Multiaddr(a.listen_addresses()[0])))
            await until(lambda: a.observed_addresses.reports > 0 and b.observed_addresses.reports > 0, "identify")
            # On loopback everyone is seen at 127.0.0.1: never a sign of being public.
            for end in (a, b):
                [seen] = end.observed_addresses.snapshot()
                assert seen.address.startswith("/ip4/127.0.0.1/tcp/") and seen.observers == 1
                assert end.observed_addresses.seen_at(end.listen_addresses()) == []


def _reachability_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transports.reachability" and r.levelno >= logging.INFO]


def _assert_no_blocks(caplog: pytest.LogCaptureFixture) -> None:
    """No record spans lines or carries a traceback (py-libp2p's stream-failure block did both)."""
    blocks = [r for r in caplog.records if r.levelno >= logging.INFO and ("\n" in r.getMessage() or r.exc_info)]
    assert not blocks, [f"{r.name}: {r.getMessage()}" for r in blocks]


async def _settle(transport: Libp2pTransport) -> float:
    """Seconds until ``transport`` has a reachability verdict."""
    started = trio.current_time()
    await until(lambda: transport.status().reachability != "unknown", "a reachability verdict")
    return trio.current_time() - started


@pytest.mark.slow
async def test_a_relay_without_our_dial_back_leaves_the_node_private_by_inference(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="transports.reachability")
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            # A relay that answers neither our dial-back nor AutoNAT, as js and go relays by default.
            relay = await stack.enter_async_context(
                serving(SigningKey.generate(), relay_service=True, reachability_services=())
            )
            relay_address = relay.listen_addresses()[0]
            started = trio.current_time()
            a = await stack.enter_async_context(serving(SigningKey.generate(), relays=[relay_address]))
            waited = await _settle(a)
            settled = trio.current_time() - started
            status = a.status()
            a_peer = a.peer_id
            assert status.reachability == "private" and status.reachability_source == "inference"
            assert status.reachability_checked_by == relay_address
            assert "/p2p-circuit" in a.listen_addresses()[0] and "/p2p-circuit" not in a.listen_addresses()[-1]
            assert settled < 5.0, settled
            print(f"settled private by inference {settled:.2f} s after start ({waited:.2f} s after serving)")
            # Settled: the next check is a recheck interval away, not 2 s.
            checks = a.status().reachability_checks
            await trio.sleep(3)
            assert a.status().reachability_checks == checks
    # One state change, one line: A's, and the relay's (A's dial-back server tells it it is public).
    [line] = [x for x in _reachability_lines(caplog) if a_peer not in x]
    [relay_line] = [x for x in _reachability_lines(caplog) if a_peer in x]
    assert relay_line.startswith(f"reachability: public (our dial-back by {a_peer} reached "), relay_line
    assert line.startswith(f"reachability: private (inferred: a reservation on {relay_address} works"), line
    skipped = [r for r in caplog.records if r.name == "transports.reachability" and "skipping" in r.getMessage()]
    assert skipped and all(r.levelno == logging.DEBUG for r in skipped)  # asked, quietly refused
    _assert_no_blocks(caplog)


async def _connect(host: IHost, to: Libp2pTransport) -> None:
    await dial_exactly(host, info_from_p2p_addr(multiaddr.Multiaddr(to.listen_addresses()[0])))


@pytest.mark.slow
async def test_autonat_counts_a_dial_back_on_a_fresh_connection_and_not_a_reused_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(serving(SigningKey.generate()))
            watch = InboundWatch()
            watch.attach(a.host)

            # py-libp2p's own AutoNAT server "dials back" over the connection A already holds:
            # it answers OK for a port nothing listens on. Not trusted, so A stays unknown.
            reuser = new_noise_host(create_new_key_pair(os.urandom(32)), dial_timeout_s=5)
            await stack.enter_async_context(reuser.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            stack.push_async_callback(reuser.close)
            AutoNATService(cast(BasicHost, reuser))
            await dial_exactly(a.host, PeerInfo(reuser.get_id(), reuser.get_addrs()))
            fooled = await ask_autonat(a.host, reuser.get_id(), ["/ip4/127.0.0.1/tcp/1"], watch)
            assert fooled.reachability == "unknown" and fooled.error and "not trusted" in fooled.error, fooled
            a.reachability.recheck_now()
            await until(lambda: a.status().reachability_checks >= 2, "a check with only the reusing server")
            assert a.status().reachability == "unknown" and a.status().reachability_sources == ()

            # Our AutoNAT server (no dial-back protocol) dials from a fresh host: a true "public".
            b = await stack.enter_async_context(serving(SigningKey.generate(), reachability_services=("autonat",)))
            await _connect(a.host, b)
            a.reachability.recheck_now()
            await until(lambda: a.status().reachability == "public", "a public by AutoNAT")
            status = a.status()
            assert status.reachability_source == "autonat" and status.reachability_checked_by == b.peer_id
            [seen] = [d for d in b.status().dialbacks if d.peer == a.peer_id]
            assert seen.reachability == "public" and seen.source == "autonat"

            # Its negative is a real dial too: nothing listens at the port named.
            await trio.sleep(2.1)  # the server's per-peer rate limit
            closed = await ask_autonat(a.host, PeerID.from_base58(b.peer_id), ["/ip4/127.0.0.1/tcp/1"], watch)
            assert closed.reachability == "private" and closed.error and "127.0.0.1/tcp/1" in closed.error, closed
            refused = await ask_autonat(a.host, PeerID.from_base58(b.peer_id), ["/ip4/127.0.0.1/tcp/1"], watch)
            assert refused.reachability == "unknown" and refused.error == "E_DIAL_REFUSED: asked too often"
    _assert_no_blocks(caplog)


@pytest.mark.slow
async def test_checks_back_off_while_nobody_can_answer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(serving(SigningKey.generate()))
            # Its only peer is a plain libp2p host: no dial-back, no AutoNAT, no relay.
            stranger = new_noise_host(create_new_key_pair(os.urandom(32)), dial_timeout_s=5)
            await stack.enter_async_context(stranger.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            stack.push_async_callback(stranger.close)
            await dial_exactly(a.host, PeerInfo(stranger.get_id(), stranger.get_addrs()))
            watch = InboundWatch()
            watch.attach(a.host)
            asked: list[float] = []

            def candidates() -> list[PeerID]:
                asked.append(trio.current_time())
                return [stranger.get_id()]

            monitor = ReachabilityMonitor(
                candidates=candidates,
                own_addresses=a.listen_addresses,
                askers=(
                    ("dialback", lambda peer, addrs: dialback_outcome(a.host, peer, addrs)),
                    ("autonat", lambda peer, addrs: ask_autonat(a.host, peer, addrs, watch)),
                ),
                observed=a.observed_addresses,
                recheck_s=0.4,
                retry_min_s=0.05,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                await trio.sleep(2.5)
                nursery.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
    # 0.05, 0.1, 0.2, then the recheck interval: 8-9 checks in 2.5 s (at a fixed 0.05 s: 50).
    assert 5 <= monitor.attempts <= 10 and monitor.reachability == "unknown", (monitor.attempts, gaps)
    # Each gap is the wait plus the check itself: a few ms, but the first check negotiates
    # with a peer not yet identified, so its gap says little.
    for gap, wait in zip(gaps[1:], [0.1, 0.2] + [0.4] * len(gaps), strict=False):
        assert wait <= gap <= wait + 0.3, gaps  # slack for a loaded machine
    assert monitor.verdicts == {} and _reachability_lines(caplog) == []  # no change, no line
    _assert_no_blocks(caplog)


def test_the_newest_dial_back_test_wins_and_the_inference_only_stands_alone() -> None:
    inferred = DialbackOutcome("relay", "private", at=10.0, source="inference")
    ours = DialbackOutcome("r", "public", at=5.0, source="dialback")
    autonat = DialbackOutcome("js", "private", at=7.0, source="autonat")
    assert combine({}) is None
    assert combine({"inference": inferred}) == inferred
    assert combine({"inference": inferred, "dialback": ours}) == ours  # a test beats a guess, however old
    assert combine({"inference": inferred, "dialback": ours, "autonat": autonat}) == autonat
    assert combine({"dialback": replace(ours, reachability="unknown")}) is None


def _settle_behind_nat(topo: NatTopology, tmp_path: Path, relay_services: str) -> tuple[float, dict[str, Any], str]:
    """A behind G1 with R (answering ``relay_services``) as its only relay: seconds from A's
    ready line to its verdict, its status, and its stderr."""
    relay = NsNode(topo, "r", tmp_path / f"r-{relay_services or 'none'}", "--relay-service",
                   "--reachability-services", relay_services)  # fmt: skip
    try:
        relay_address = f"/ip4/{topo.addr['r']}/tcp/{PORT}/p2p/{relay.status()['peer_id']}"
        a = NsNode(topo, "a", tmp_path / f"a-{relay_services or 'none'}", "--relay", relay_address)
        try:
            started = time.monotonic()
            status = a.wait_status("a verdict", lambda s: s["reachability"] != "unknown", timeout_s=30)
            return time.monotonic() - started, status, a.stderr()
        finally:
            a.stop()
    finally:
        relay.stop()


@pytest.mark.slow
def test_behind_nat_a_relay_without_our_dial_back_still_makes_the_node_private(tmp_path: Path) -> None:
    require_netns()
    cleanup_stale(PREFIX)
    with NatTopology(prefix=PREFIX) as topo:
        inferred, status, stderr = _settle_behind_nat(topo, tmp_path, "")
        assert status["reachability"] == "private" and status["reachability_source"] == "inference", status
        assert "/p2p-circuit/" in status["listen_addresses"][0]
        assert "Traceback" not in stderr and "Failed to open stream" not in stderr, stderr
        tested, status, _ = _settle_behind_nat(topo, tmp_path, "dialback,autonat")
        assert status["reachability"] == "private" and status["reachability_source"] == "dialback", status
    print(f"\nbehind NAT: private by inference in {inferred:.2f} s; by our dial-back in {tested:.2f} s")
    assert inferred < 5.0


JS_RELAY = Path(__file__).resolve().parent / "js" / "relay.mjs"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("node") is None or not (JS_RELAY.parent / "node_modules" / "libp2p").is_dir(),
    reason="needs node and tests/js/node_modules (the js interop harness)",
)
async def test_a_js_relay_with_default_settings_makes_the_node_private(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="transports.reachability")
    node = shutil.which("node")
    assert node is not None
    command = [node, str(JS_RELAY), "--listen", "/ip4/127.0.0.1/tcp/0"]
    relay = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(60):
            assert relay.stdout is not None
            line = await trio.to_thread.run_sync(relay.stdout.readline)  # its addresses, once listening
            relay_address = json.loads(line)["addrs"][0]
            started = trio.current_time()
            async with serving(SigningKey.generate(), relays=[relay_address]) as a:
                await _settle(a)
                settled = trio.current_time() - started
                status = a.status()
                assert status.reachability == "private" and status.reachability_source == "inference", status
                assert "/p2p-circuit" in a.listen_addresses()[0]
    finally:
        relay.kill()
        relay.wait(timeout=10)
    print(f"\njs relay: private by inference {settled:.2f} s after start")
    assert settled < 10.0
    [line_logged] = _reachability_lines(caplog)
    assert line_logged.startswith(f"reachability: private (inferred: a reservation on {relay_address}"), line_logged
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("/eidetica/dialback/1.0.0" in m for m in skipped) and any("/libp2p/autonat/1.0.0" in m for m in skipped)
    _assert_no_blocks(caplog)


async def _autonat_exchange(host: IHost, peer: PeerID, payload: bytes) -> AutoNATMessage:
    stream = await open_quietly(host, peer, AUTONAT_PROTOCOL)
    try:
        await stream.write(encode_varint_prefixed(payload))
        answer = AutoNATMessage()
        answer.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 8192))
        return answer
    finally:
        await stream.close()


async def test_the_autonat_server_answers_malformed_requests_and_keeps_serving() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(serving(SigningKey.generate(), reachability_services=()))
            b = await stack.enter_async_context(serving(SigningKey.generate()))
            await _connect(a.host, b)
            server = PeerID.from_base58(b.peer_id)
            garbage = await _autonat_exchange(a.host, server, b"\xff\x01 not protobuf")
            assert garbage.dialResponse.status == AutoNATMessage.E_BAD_REQUEST
            wrong = AutoNATMessage(type=AutoNATMessage.DIAL)
            wrong.dial.peer.id = server.to_bytes()  # someone else's ID: we would dial a third party
            wrong.dial.peer.addrs.append(multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1").to_bytes())
            answer = await _autonat_exchange(a.host, server, wrong.SerializeToString())
            assert answer.dialResponse.status == AutoNATMessage.E_BAD_REQUEST
            empty = AutoNATMessage(type=AutoNATMessage.DIAL)
            empty.dial.peer.id = a.host.get_id().to_bytes()
            answer = await _autonat_exchange(a.host, server, empty.SerializeToString())
            assert answer.dialResponse.status == AutoNATMessage.E_DIAL_REFUSED  # no address to dial
            assert answer.dialResponse.statusText == "no TCP address to dial"
            with pytest.raises(ProtocolMissing):  # A answers neither protocol
                await open_quietly(b.host, PeerID.from_base58(a.peer_id), AUTONAT_PROTOCOL)
