"""Reachability from any libp2p peer: the observed-address table, AutoNAT v1 (answered and
asked, trusted only from a fresh connection), inference from a working reservation, the
combiner of all three, and the back-off between checks. Real hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from dag import SigningKey
from sync.messages import Message
from sync.transport import RequestContext
from tests.waiting import until
from transports.libp2p import Libp2pTransport
from transports.observed import ObservedAddresses, observer_group, thin_waist
from transports.relay import dial_exactly

TIMEOUT_S = 30


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
