"""Request streams negotiate lazily: one write carries the protocol proposal and the request."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from dag import SigningKey
from sync import UnreachableError
from sync.messages import Ack, Count, Message
from sync.transport import RequestContext
from transports.libp2p import PROTOCOL_ID, Libp2pTransport


async def _pong(message: Message, _context: RequestContext) -> AsyncIterator[Message]:
    assert isinstance(message, Count)
    yield Ack()


async def _start(nursery: trio.Nursery) -> Libp2pTransport:
    transport = Libp2pTransport(SigningKey.generate(), listen=["/ip4/127.0.0.1/tcp/0"], hole_punching=False)
    await nursery.start(transport.run)
    await nursery.start(transport.serve, _pong)
    return transport


async def _request(client: Libp2pTransport, server: Libp2pTransport) -> list[Message]:
    address = server.listen_addresses()[0]
    with trio.fail_after(10):
        return [answer async for answer in client.request(address, Count(1, 1))]


async def test_many_requests_each_on_its_own_lazily_negotiated_stream() -> None:
    async with trio.open_nursery() as nursery:
        server, client = await _start(nursery), await _start(nursery)
        for _ in range(20):
            assert await _request(client, server) == [Ack()]
        nursery.cancel_scope.cancel()


async def test_a_peer_that_does_not_speak_the_protocol_is_an_error_not_a_hang() -> None:
    async with trio.open_nursery() as nursery:
        server, client = await _start(nursery), await _start(nursery)
        server.host.remove_stream_handler(PROTOCOL_ID)
        with pytest.raises(UnreachableError, match="does not speak"):
            await _request(client, server)
        assert await _request(server, client) == [Ack()]  # both hosts carry on
        nursery.cancel_scope.cancel()
