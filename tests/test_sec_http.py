"""Slow and oversize HTTP request bodies against a real HTTP transport server on loopback.

The attack seen: many connections each send most of a 16 MiB body and then a byte every
45 s; the server buffered every body whole with only a per-chunk timeout, so 60 of them
held ~1 GiB for minutes. Here each defence is driven through a raw TCP socket (what any
client can send), with the deadlines shortened so every test takes seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from scripts.flood_http import Node, run_flood
from sync.messages import Ack, Error, Message, decode_message, encode_message
from sync.transport import RequestContext
from transports.hostport import parse_host_port
from transports.http import DEFAULT_MAX_INFLIGHT_BODY_BYTES_PER_SOURCE, HttpTransport

TIMEOUT_S = 20  # every test is bounded; each takes a few seconds at most
HEAD = b"POST /api/v0 HTTP/1.1\r\nhost: x\r\ncontent-type: application/msgpack\r\n"


async def _ack(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
    yield Ack()


@asynccontextmanager
async def _serving(**options: Any) -> AsyncIterator[tuple[HttpTransport, str]]:
    transport = HttpTransport(bind="127.0.0.1:0", **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, _ack)
        yield transport, transport.listen_addresses()[0]
        nursery.cancel_scope.cancel()


async def _connect(address: str) -> trio.SocketStream:
    host, port = parse_host_port(address)
    return await trio.open_tcp_stream(host, port)


async def _status(stream: trio.SocketStream) -> tuple[int, bytes]:
    """The status code and body (Content-Length framed) of the answer on ``stream``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def _code(body: bytes) -> str:
    error = decode_message(body)
    assert isinstance(error, Error)
    return error.code


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_a_declared_length_over_the_limit_is_refused_before_any_body() -> None:
    """Content-Length of limit + 1 and no body at all: 413 at once (it used to wait for the body)."""
    with trio.fail_after(TIMEOUT_S):
        async with _serving(max_frame_bytes=64 * 1024) as (transport, address):
            stream = await _connect(address)
            async with stream:
                await stream.send_all(HEAD + b"content-length: %d\r\n\r\n" % (64 * 1024 + 1))
                with trio.fail_after(2):  # the old server waited for the body (60 s stall timeout)
                    status, body = await _status(stream)
                assert status == 413 and _code(body) == "oversize"
            assert transport.body_budget.used == 0


async def test_a_chunked_body_is_cut_as_soon_as_it_passes_the_limit() -> None:
    """A chunked body just over the limit, then silence: 413 at once, not after draining more."""
    limit = 64 * 1024
    with trio.fail_after(TIMEOUT_S):
        async with _serving(max_frame_bytes=limit) as (transport, address):
            stream = await _connect(address)
            async with stream:
                await stream.send_all(HEAD + b"transfer-encoding: chunked\r\n\r\n")
                for _ in range(5):  # 80 KiB in 16 KiB chunks, never ended
                    await stream.send_all(_chunk(b"\x00" * (16 * 1024)))
                with trio.fail_after(2):  # the old server read on to twice the limit, then stalled
                    status, body = await _status(stream)
                assert status == 413 and _code(body) == "oversize"
            assert transport.body_budget.used == 0


async def test_a_body_trickling_in_is_cut_at_the_whole_body_deadline_and_freed() -> None:
    """A byte every 0.2 s never stalls a chunk wait, but the whole body has 1 s: 408, memory given back."""
    with trio.fail_after(TIMEOUT_S):
        async with _serving(request_timeout_s=10.0, body_timeout_s=1.0) as (transport, address):
            stream = await _connect(address)
            async with stream:
                await stream.send_all(HEAD + b"content-length: 100000\r\n\r\n" + b"\x00" * 50_000)
                started = trio.current_time()
                answer: list[tuple[int, bytes]] = []

                async def read() -> None:
                    answer.append(await _status(stream))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    for _ in range(40):  # 8 s of trickle at most; the answer ends it
                        await trio.sleep(0.2)
                        if answer:
                            break
                        await stream.send_all(b"\x00")
                        assert transport.body_budget.used > 0  # the body is held while it arrives
                elapsed = trio.current_time() - started
                status, body = answer[0]
                assert status == 408 and _code(body) == "timeout"
                assert elapsed < 3.0, f"the 1 s body deadline took {elapsed:.1f} s"
            assert transport.body_budget.used == 0


async def test_slow_connections_together_hold_no_more_than_the_body_budget() -> None:
    """Six connections each send 300 KiB and stall: with a 1 MiB budget, the later ones get 503."""
    budget = 1024 * 1024
    with trio.fail_after(TIMEOUT_S):
        async with _serving(max_inflight_body_bytes=budget, body_timeout_s=3.0) as (transport, address):
            streams = [await _connect(address) for _ in range(6)]
            statuses: list[int] = []
            try:
                for stream in streams:
                    await stream.send_all(HEAD + b"content-length: 400000\r\n\r\n" + b"\x00" * 300_000)
                    await trio.sleep(0.1)  # let the server take this one in before the next
                    assert transport.body_budget.used <= budget
                with trio.fail_after(1):  # the ones over the budget are answered at once
                    for stream in streams[3:]:
                        status, body = await _status(stream)
                        assert _code(body) == "transport"
                        statuses.append(status)
                assert statuses == [503, 503, 503]
                assert transport.body_budget.used == 3 * 300_000  # the first three, still arriving
                with trio.fail_after(5):  # and those are cut at the body deadline
                    for stream in streams[:3]:
                        status, _body = await _status(stream)
                        assert status == 408
                assert transport.body_budget.used == 0
            finally:
                for stream in streams:
                    await stream.aclose()


async def _connect_from(address: str, source: str) -> trio.SocketStream:
    """A connection from another loopback address (all of 127.0.0.0/8 is local on Linux)."""
    host, port = parse_host_port(address)
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def test_one_address_holds_only_its_share_and_small_bodies_always_pass() -> None:
    """Per source 1 MiB of a 1.5 MiB budget: a second big body from 127.0.0.1 is refused, one
    from 127.0.0.2 is taken, and a small request from the full source still gets answered."""
    mib = 1024 * 1024
    options = {"max_inflight_body_bytes": 3 * mib // 2, "max_inflight_body_bytes_per_source": mib}
    with trio.fail_after(TIMEOUT_S):
        async with _serving(body_timeout_s=5.0, **options) as (transport, address):
            held = await _connect(address)
            others = [await _connect(address), await _connect_from(address, "127.0.0.2")]
            try:
                await held.send_all(HEAD + b"content-length: 2000000\r\n\r\n" + b"\x00" * 900_000)
                await trio.sleep(0.2)
                assert transport.body_budget.used == 900_000
                for stream in others:
                    await stream.send_all(HEAD + b"content-length: 2000000\r\n\r\n" + b"\x00" * 400_000)
                with trio.fail_after(2):
                    status, body = await _status(others[0])  # same address: over its 1 MiB share
                assert status == 503 and _code(body) == "transport"
                await trio.sleep(0.2)
                assert transport.body_budget.used == 1_300_000  # 127.0.0.2's body is being taken in
                small = encode_message(Ack())
                stream = await _connect(address)
                async with stream:
                    await stream.send_all(HEAD + b"content-length: %d\r\n\r\n" % len(small) + small)
                    with trio.fail_after(2):
                        assert (await _status(stream))[0] == 200
            finally:
                for stream in [held, *others]:
                    await stream.aclose()
        assert transport.body_budget.used == 0


async def test_an_honest_body_still_goes_through_after_the_refusals() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _serving(max_frame_bytes=64 * 1024, body_timeout_s=1.0) as (transport, address):
            stream = await _connect(address)
            async with stream:
                await stream.send_all(HEAD + b"content-length: %d\r\n\r\n" % (64 * 1024 + 1))
                assert (await _status(stream))[0] == 413
            body = encode_message(Ack())
            stream = await _connect(address)
            async with stream:
                await stream.send_all(HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)
                status, _ = await _status(stream)
                assert status == 200
            assert transport.body_budget.used == 0


@pytest.mark.slow
def test_a_flood_against_a_real_node_holds_no_more_than_the_body_budget(tmp_path: Path) -> None:
    """16 connections x 15.7 MB against ``eidetica-node run``: RSS grows by one address's share, not 250 MB."""
    node = Node(tmp_path / "data")
    try:
        result = trio.run(partial(run_flood, node, 16, 15_700_000, observe_s=6.0))
    finally:
        node.stop()
    grown = result.during.rss_mib - result.before.rss_mib
    share_mib = DEFAULT_MAX_INFLIGHT_BODY_BYTES_PER_SOURCE / 2**20  # every connection comes from 127.0.0.1
    assert grown < share_mib + 40, f"RSS grew {grown:.0f} MiB during the flood"  # it grew ~244 MiB before
    assert result.answers.get("503") == 15  # one 15.7 MB body fits in an address's 16 MiB; the rest are refused
