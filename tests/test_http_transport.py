"""What only the HTTP transport has: JSON and NDJSON, status codes, /health, the bound port,
frames cut by a dying server, and two nodes in separate processes.

Everything runs on 127.0.0.1. Fake servers (raw trio TCP) stand in for peers that
misbehave in ways our own server never would.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import msgpack
import pytest
import trio

from dag import Instance, Permission
from sync import (
    MalformedMessageError,
    OversizeMessageError,
    PeerError,
    RequestTimeoutError,
    TransportError,
    UnauthorizedError,
    UnreachableError,
    proofs,
)
from sync.messages import (
    PROTOCOL_VERSION,
    Ack,
    AuthProof,
    Bootstrap,
    BootstrapPending,
    Count,
    DatabaseOffer,
    Error,
    Handshake,
    HandshakeConfirm,
    HandshakeReply,
    Incremental,
    Message,
    SendEntries,
    SyncTree,
    decode_message,
    encode_message,
)
from sync.transport import Handler, RequestContext, TaskStatus
from tests.kit_http import HttpKit
from tests.transport_kits import Node
from transports.errors import PortInUseError
from transports.hostport import parse_host_port
from transports.http import HttpTransport
from transports.http_codec import (
    CONTENT_JSON,
    CONTENT_MSGPACK,
    CONTENT_NDJSON,
    FrameReader,
    decode_json,
    encode_frame,
    encode_json,
    from_json,
    to_json,
    unmapped_fields,
)

TIMEOUT_S = 20  # every test is bounded; loopback work here takes well under a second
REPO = Path(__file__).resolve().parents[1]
DB_CID = Instance.in_memory().create_database(name="cid-source").root_cid  # any valid database ID


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@asynccontextmanager
async def _nodes(count: int) -> AsyncIterator[list[Node]]:
    kit = HttpKit()
    async with AsyncExitStack() as stack:
        yield [await kit.node(stack, f"node{i}") for i in range(count)]


@asynccontextmanager
async def _serving(handler: Handler, **options: Any) -> AsyncIterator[str]:
    """A bare HttpTransport serving ``handler``; yields its address."""
    transport = HttpTransport(bind="127.0.0.1:0", **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, handler)
        yield transport.listen_addresses()[0]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _client(**options: Any) -> AsyncIterator[HttpTransport]:
    transport = HttpTransport(bind="127.0.0.1:0", **options)
    try:
        yield transport
    finally:
        await transport.aclose()


@asynccontextmanager
async def _fake_server(serve: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[str]:
    """A raw TCP server on loopback running ``serve`` per connection; yields its address."""

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await serve(stream)
        except trio.BrokenResourceError:
            pass  # the client hung up first
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, guarded, 0, host="127.0.0.1"))
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def _read_request(stream: trio.SocketStream) -> None:
    """Read one HTTP request (headers and Content-Length body) off ``stream``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(body) < length:
        body += await stream.receive_some(65536)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


FRAMES_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-eidetica-frames\r\ntransfer-encoding: chunked\r\n\r\n"


async def _answers(transport: HttpTransport, address: str, message: Message) -> list[Message]:
    return [answer async for answer in transport.request(address, message)]


def _public_db(node: Node, entries: int) -> Any:
    db = node.instance.create_database(name="public")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.read())
    for i in range(entries):
        with db.transaction() as txn:
            txn.doc("notes").set(f"k{i % 10}", "x" * 100)
    return db


# ---- the JSON mapping ----------------------------------------------------------------

EVERY_MESSAGE: list[Message] = [
    Handshake("ed25519:k", "a", PROTOCOL_VERSION, b"\x01" * 32, (("http", "127.0.0.1:1"),)),
    HandshakeReply(
        "ed25519:k", "b", PROTOCOL_VERSION, b"\x02" * 64, b"\x03" * 32, (DatabaseOffer(DB_CID, "db", True),)
    ),
    HandshakeConfirm("ed25519:k", b"\x04" * 32, b"\x05" * 64),
    SyncTree(DB_CID, (DB_CID,), (DB_CID,), (DB_CID,), (b"entry",), AuthProof("ed25519:k", 7, b"n", b"s"), "read"),
    Bootstrap(DB_CID, (DB_CID,), (b"e1", b"e2"), more=True),
    Incremental(DB_CID, (), (b"",), received=3),
    BootstrapPending(DB_CID, "req-1", "waiting"),
    SendEntries(DB_CID, (b"e",), None),
    Ack(),
    Count(3, 2, 1),
    Error("malformed", "no"),
]


def test_json_mapping_covers_every_field() -> None:
    assert unmapped_fields() == set()
    assert {m.TYPE for m in EVERY_MESSAGE} == {
        "Handshake", "HandshakeReply", "HandshakeConfirm", "SyncTree", "Bootstrap", "Incremental",
        "BootstrapPending", "SendEntries", "Ack", "Count", "Error",
    }  # fmt: skip


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: m.TYPE)
def test_json_round_trip(message: Message) -> None:
    assert decode_json(encode_json(message)) == message
    json.dumps(to_json(message))  # plain JSON: no bytes left anywhere


def test_json_bytes_are_standard_base64() -> None:
    body = to_json(SyncTree(DB_CID, tips=(DB_CID,), auth=AuthProof("ed25519:k", 1, b"\xff\xfe", b"\xfb")))
    assert body["db"] == _b64(DB_CID) and body["tips"] == [_b64(DB_CID)]
    assert body["auth"] == {"key": "ed25519:k", "timestamp_ms": 1, "nonce": "//4=", "signature": "+w=="}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "Ack", "x": NaN}',
        b"\xff\xfe",
        json.dumps({"type": "SyncTree", "db": "!!!"}).encode(),  # not base64
        json.dumps({"type": "SyncTree", "db": _b64(DB_CID)[:-1]}).encode(),  # padding cut
        json.dumps({"type": "SyncTree", "db": _b64(DB_CID) + "\n"}).encode(),  # whitespace
        json.dumps({"type": "SyncTree", "db": _b64(DB_CID), "tips": "abc="}).encode(),  # not a list
        json.dumps({"type": "Count", "received": 1}).encode(),  # missing fields
        json.dumps({"type": "Ack", "extra": 1}).encode(),  # unknown field
        json.dumps({"type": "HandshakeConfirm", "device_key": "k", "counter_challenge": 5, "signature": ""}).encode(),
    ],
)
def test_json_decoding_is_strict(body: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_json(body)


def test_json_non_canonical_base64_is_refused() -> None:
    with pytest.raises(MalformedMessageError):
        from_json({"type": "SendEntries", "db": _b64(DB_CID), "entries": ["AB=="]})  # "AA==" is canonical
    assert from_json({"type": "SendEntries", "db": _b64(DB_CID), "entries": ["AA=="]}) == SendEntries(
        DB_CID, (b"\x00",)
    )


# ---- frames ----------------------------------------------------------------------------


def test_frame_reader_splits_any_chunking() -> None:
    frames = [b"", b"a", os.urandom(70_000), b"xyz" * 1000]
    stream = b"".join(encode_frame(f) for f in frames)
    for size in (1, 3, 4, 5, 1000, 65_536, len(stream)):
        reader = FrameReader(1 << 20)
        got = [frame for start in range(0, len(stream), size) for frame in reader.feed(stream[start : start + size])]
        assert got == frames and reader.pending == 0


def test_frame_reader_refuses_an_oversize_header_before_its_body() -> None:
    reader = FrameReader(1000)
    assert reader.feed(encode_frame(b"x" * 1000)) == [b"x" * 1000]
    with pytest.raises(OversizeMessageError):
        reader.feed((1001).to_bytes(4, "big"))


def test_addresses() -> None:
    assert parse_host_port("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_host_port("[::1]:80") == ("::1", 80)
    assert parse_host_port("node.local:1") == ("node.local", 1)
    for bad in ("127.0.0.1", "127.0.0.1:99999", "a b:1", "h:1/path", "h:1?x", "user@h:1", ""):
        with pytest.raises(ValueError):
            parse_host_port(bad)


# ---- the server, from any HTTP client ----------------------------------------------------


async def test_health() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _nodes(1) as [a], httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://{a.address.address}/health")
            assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_json_handshake() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _nodes(1) as [a], httpx.AsyncClient(trust_env=False) as client:
            challenge = os.urandom(32)
            hello = {
                "type": "Handshake",
                "device_key": "ed25519:" + _b64(b"\x00" * 32),
                "display_name": "curl",
                "version": PROTOCOL_VERSION,
                "challenge": _b64(challenge),
                "addresses": [],
            }
            response = await client.post(f"http://{a.address.address}/api/v0", json=hello)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(CONTENT_NDJSON)
            [line] = response.text.splitlines()
            assert json.loads(line)["challenge_signature"]  # base64 text in the JSON itself
            reply = decode_json(line.encode())
            assert isinstance(reply, HandshakeReply)
            assert reply.device_key == a.instance.device_id
            assert proofs.check_challenge(reply.device_key, challenge, reply.challenge_signature)


async def test_json_sync_tree_streams_ndjson() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _nodes(1) as [a], httpx.AsyncClient(trust_env=False) as client:
            db = _public_db(a, 2500)  # over the 2,000 entries of one answer frame
            request = {"type": "SyncTree", "db": _b64(db.root_cid)}
            lines: list[str] = []
            url = f"http://{a.address.address}/api/v0"
            async with client.stream("POST", url, json=request) as response:
                assert response.headers["content-type"].startswith(CONTENT_NDJSON)
                async for line in response.aiter_lines():
                    lines.append(line)
            decoded = [decode_json(line.encode()) for line in lines if line]
            answers = [m for m in decoded if isinstance(m, Bootstrap)]
            assert len(answers) == len(decoded) >= 2
            assert [m.more for m in answers] == [True] * (len(answers) - 1) + [False]
            entries = [e for m in answers for e in m.entries]
            assert len(entries) == len(db) and entries[0] == db.raw(db.root_cid)
            assert set(answers[-1].tips) == set(db.tip_cids())


TOO_MANY_ENTRIES = msgpack.packb({"type": "SendEntries", "db": b"", "entries": [b""] * 10_001})


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        (CONTENT_MSGPACK, b"\xc1garbage", 400, "malformed"),
        (CONTENT_MSGPACK, msgpack.packb({"type": "Nope"}), 400, "unknown-message"),
        (CONTENT_MSGPACK, TOO_MANY_ENTRIES, 413, "oversize"),
        (CONTENT_JSON, b"{not json", 400, "malformed"),
        (CONTENT_JSON, json.dumps({"type": "SyncTree", "db": "no base64!"}).encode(), 400, "malformed"),
        (CONTENT_JSON, json.dumps({"type": "Nope"}).encode(), 400, "unknown-message"),
        ("text/plain", b"hello", 415, "malformed"),
    ],
)
async def test_undecodable_requests_get_an_error_and_never_reach_the_handler(
    content_type: str, body: bytes, status: int, code: str
) -> None:
    reached: list[Message] = []

    async def handler(message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        reached.append(message)
        yield Ack()

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address, httpx.AsyncClient(trust_env=False) as client:
            response = await client.post(
                f"http://{address}/api/v0", content=body, headers={"content-type": content_type}
            )
            assert response.status_code == status
            if content_type == CONTENT_JSON:
                assert response.headers["content-type"].startswith(CONTENT_JSON)
                error = decode_json(response.content)
            else:
                assert response.headers["content-type"].startswith(CONTENT_MSGPACK)
                error = decode_message(response.content)
            assert isinstance(error, Error) and error.code == code
            assert reached == []
            ok = await client.post(
                f"http://{address}/api/v0", content=encode_message(Ack()), headers={"content-type": CONTENT_MSGPACK}
            )
            assert ok.status_code == 200 and len(reached) == 1  # and the server still serves


@pytest.mark.parametrize("content_type", [CONTENT_MSGPACK, CONTENT_JSON])
async def test_oversize_body_gets_413_in_the_request_format(content_type: str) -> None:
    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()

    with trio.fail_after(TIMEOUT_S):
        async with (
            _serving(handler, max_frame_bytes=64 * 1024) as address,
            httpx.AsyncClient(trust_env=False) as client,
        ):
            for size in (64 * 1024 + 1, 1024 * 1024):  # just over; far over (not drained)
                response = await client.post(
                    f"http://{address}/api/v0", content=b"{" * size, headers={"content-type": content_type}
                )
                assert response.status_code == 413
                decode = decode_json if content_type == CONTENT_JSON else decode_message
                error = decode(response.content)
                assert isinstance(error, Error) and error.code == "oversize"


async def test_a_stalled_body_gets_408() -> None:
    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()  # pragma: no cover - never reached

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler, request_timeout_s=0.3) as address:
            host, port = parse_host_port(address)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                head = b"POST /api/v0 HTTP/1.1\r\nhost: x\r\ncontent-type: application/msgpack\r\n"
                await stream.send_all(head + b"content-length: 100\r\n\r\n" + b"\x81" * 10)  # then nothing
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive_some(65536)
                assert answer.startswith(b"HTTP/1.1 408")


async def test_bodies_up_to_16_mib_are_accepted() -> None:
    """hypercorn's h11 limits (16 KiB incomplete events) cap headers, not a 16 MiB body."""
    seen: list[int] = []

    async def handler(message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        assert isinstance(message, SendEntries)
        seen.append(sum(len(e) for e in message.entries))
        yield Count(len(message.entries), 0)

    entries = tuple(b"\x00" * (4 * 1024 * 1024 - 64) for _ in range(4))  # 16 MiB - a little, in 4 MiB entries
    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address, _client() as client:
            assert await _answers(client, address, SendEntries(DB_CID, entries)) == [Count(4, 0)]
            assert seen == [sum(len(e) for e in entries)]
            with pytest.raises(OversizeMessageError):  # refused before anything is sent
                await _answers(client, address, SendEntries(DB_CID, (*entries, b"\x00" * 1024)))


# ---- the client --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Async generator 'transports.http.HttpTransport.request':ResourceWarning")
async def test_multi_frame_answer_is_streamed_and_the_connection_reused() -> None:
    remotes: list[str | None] = []
    frames = [Bootstrap(DB_CID, (), tuple(os.urandom(450) for _ in range(2000)), more=True) for _ in range(4)]
    frames.append(Bootstrap(DB_CID, (DB_CID,), (b"last",)))
    step = trio.Event()

    async def handler(_message: Message, context: RequestContext) -> AsyncIterator[Message]:
        remotes.append(context.remote)
        yield frames[0]
        await step.wait()  # the first frame reaches the client before the rest exists
        for frame in frames[1:]:
            yield frame

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address, _client() as client:
            got: list[Message] = []
            async for answer in client.request(address, SyncTree(DB_CID)):
                got.append(answer)
                step.set()
            assert got == frames
            async for answer in client.request(address, SyncTree(DB_CID)):  # as sync_database does
                if not getattr(answer, "more", False):
                    break  # a caller may stop at the last answer: the connection is still reusable
            await _answers(client, address, SyncTree(DB_CID))
            assert remotes[0] is not None and remotes == [remotes[0]] * 3  # one connection, kept alive


async def test_handler_failure_mid_answer_becomes_an_error_frame() -> None:
    calls = 0

    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        nonlocal calls
        calls += 1
        yield Bootstrap(DB_CID, (), (b"one",), more=True)
        raise RuntimeError("boom")

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address, _client() as client:
            answers = await _answers(client, address, SyncTree(DB_CID))
            assert answers[0] == Bootstrap(DB_CID, (), (b"one",), more=True)
            assert isinstance(answers[1], Error) and answers[1].code == "internal"
            await _answers(client, address, SyncTree(DB_CID))
            assert calls == 2


async def test_error_status_raises_the_error_it_names() -> None:
    async def serve(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        body = encode_message(Error("unauthorized", "who are you"))
        head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n"
        await stream.send_all(head % len(body) + body)

    async def not_ours(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")

    async def internal(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        body = encode_message(Error("internal", "oops"))
        head = b"HTTP/1.1 500 Oops\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n"
        await stream.send_all(head % len(body) + body)

    with trio.fail_after(TIMEOUT_S):
        async with _client() as client:
            async with _fake_server(serve) as address:
                with pytest.raises(UnauthorizedError, match="who are you"):
                    await _answers(client, address, Ack())
            async with _fake_server(not_ours) as address:
                with pytest.raises(TransportError, match="HTTP 404"):
                    await _answers(client, address, Ack())
            async with _fake_server(internal) as address:
                with pytest.raises(PeerError, match="oops"):
                    await _answers(client, address, Ack())


async def test_oversize_frame_from_a_peer_is_refused() -> None:
    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Bootstrap(DB_CID, (), (b"\x00" * 100_000,))

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address, _client(max_frame_bytes=50_000) as client:
            with pytest.raises(OversizeMessageError):
                await _answers(client, address, SyncTree(DB_CID))


@pytest.mark.parametrize(
    ("name", "tail"),
    [
        ("mid-frame", _chunk(encode_frame(encode_message(Ack()))[:3])),
        ("between frames", _chunk(encode_frame(encode_message(Bootstrap(DB_CID, (), (b"x",), more=True))))),
        ("after headers", b""),
    ],
)
async def test_server_dying_mid_answer_is_a_transport_error_and_the_client_carries_on(name: str, tail: bytes) -> None:
    async def dying(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(FRAMES_HEAD + tail)  # then the connection closes: no terminating chunk

    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()

    with trio.fail_after(TIMEOUT_S):
        async with _client() as client, _serving(handler) as good:
            assert await _answers(client, good, Ack()) == [Ack()]
            async with _fake_server(dying) as bad:
                with pytest.raises(TransportError) as info:
                    await _answers(client, bad, Ack())
                assert bad in str(info.value)
                assert type(info.value) is TransportError, name
            assert await _answers(client, good, Ack()) == [Ack()]


async def test_a_real_server_stopped_mid_answer() -> None:
    first_sent = trio.Event()

    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Bootstrap(DB_CID, (), (b"one",), more=True)
        first_sent.set()
        await trio.sleep_forever()
        yield Ack()  # pragma: no cover

    async def other(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()

    with trio.fail_after(TIMEOUT_S):
        async with _client() as client, _serving(other) as good:
            server = HttpTransport(bind="127.0.0.1:0")
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, handler)
                address = server.listen_addresses()[0]

                async def stop() -> None:
                    await first_sent.wait()
                    nursery.cancel_scope.cancel()  # the server goes away with the answer half sent

                nursery.start_soon(stop)
                received: list[Message] = []
                # Shielded: only the server is stopped, not this request.
                with pytest.raises(TransportError), trio.CancelScope(shield=True), trio.fail_after(TIMEOUT_S):
                    async for answer in client.request(address, SyncTree(DB_CID)):
                        received.append(answer)
                assert received == [Bootstrap(DB_CID, (), (b"one",), more=True)]
            assert server.listen_addresses() == []
            assert await _answers(client, good, Ack()) == [Ack()]


async def test_client_hanging_up_mid_answer_closes_the_handler() -> None:
    closed = trio.Event()

    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        try:
            for _ in range(1000):
                yield Bootstrap(DB_CID, (), (os.urandom(100_000),), more=True)
        finally:
            closed.set()

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address:
            async with httpx.AsyncClient(trust_env=False) as client:
                url = f"http://{address}/api/v0"
                headers = {"content-type": CONTENT_MSGPACK}
                async with client.stream("POST", url, content=encode_message(SyncTree(DB_CID)), headers=headers) as r:
                    reader = FrameReader(1 << 20)
                    async with aclosing(cast(AsyncGenerator[bytes, None], r.aiter_bytes())) as chunks:
                        async for chunk in chunks:
                            if reader.feed(chunk):
                                break
            await closed.wait()  # the server noticed and closed the handler's answers


async def test_a_peer_that_stops_reading_cannot_hold_the_server_open() -> None:
    """hypercorn's sends are shielded from cancellation; TCP_USER_TIMEOUT bounds them."""
    frames = 0

    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        nonlocal frames
        for _ in range(100):  # far more than the socket buffers hold
            frames += 1
            yield Bootstrap(DB_CID, (), (b"\x00" * 1_000_000,), more=True)
        yield Bootstrap(DB_CID, (), ())

    server = HttpTransport(bind="127.0.0.1:0", request_timeout_s=1.0)
    stopped = trio.Event()

    async def run_server(task_status: TaskStatus[trio.CancelScope]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, handler)
            task_status.started(nursery.cancel_scope)
        stopped.set()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as outer:
            scope: trio.CancelScope = await outer.start(run_server)
            host, port = parse_host_port(server.listen_addresses()[0])
            stream = await trio.open_tcp_stream(host, port)
            try:
                body = encode_message(SyncTree(DB_CID))
                head = b"POST /api/v0 HTTP/1.1\r\nhost: x\r\ncontent-type: application/msgpack\r\n"
                await stream.send_all(head + b"content-length: %d\r\n\r\n" % len(body) + body)
                while True:  # until the server is stuck sending to us
                    before = frames
                    await trio.sleep(0.2)
                    if frames == before:
                        break
                scope.cancel()
                with trio.move_on_after(10) as late:
                    await stopped.wait()
            finally:
                await stream.aclose()  # unblocks the server if the bound did not work
            assert not late.cancelled_caught, "serve() was held open by a peer that stopped reading"


async def test_unreachable_and_timeouts() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused

    async def silent(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with _client(request_timeout_s=0.3) as client:
            with pytest.raises(UnreachableError, match=f"127.0.0.1:{port}"):
                await _answers(client, f"127.0.0.1:{port}", Ack())
            with pytest.raises(UnreachableError):
                await _answers(client, "not an address", Ack())
            async with _fake_server(silent) as address:
                with pytest.raises(RequestTimeoutError, match=address):
                    await _answers(client, address, Ack())


# ---- the listening socket ------------------------------------------------------------------


async def _serve_expecting_error(transport: HttpTransport) -> BaseException:
    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()

    with pytest.raises(OSError) as info:
        await transport.serve(handler)  # fails before listening, so it never gets to wait
    return info.value


@pytest.mark.parametrize("reuse_port", [False, True])
async def test_port_in_use_is_a_clear_error(reuse_port: bool) -> None:
    with trio.fail_after(TIMEOUT_S), socket.socket() as taken:
        if reuse_port:  # as py-libp2p and some servers do: must not let a second node share the port
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = await _serve_expecting_error(HttpTransport(bind=f"127.0.0.1:{port}"))
        assert isinstance(error, PortInUseError)
        assert f"127.0.0.1:{port}" in str(error) and "in use" in str(error)


async def test_two_transports_never_share_a_port() -> None:
    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()

    with trio.fail_after(TIMEOUT_S):
        async with _serving(handler) as address:
            error = await _serve_expecting_error(HttpTransport(bind=address))
            assert isinstance(error, PortInUseError)


async def test_serving_stops_cleanly_and_frees_the_port() -> None:
    async def handler(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
        yield Ack()

    with trio.fail_after(TIMEOUT_S):
        transport = HttpTransport(bind="127.0.0.1:0", advertise=["node.example:8080"])
        assert transport.listen_addresses() == []
        async with _client() as client:
            async with trio.open_nursery() as nursery:
                await nursery.start(transport.serve, handler)
                assert transport.listen_addresses() == ["node.example:8080"]
                port = transport._port
                assert await _answers(client, f"127.0.0.1:{port}", Ack()) == [Ack()]  # a kept-alive connection
                nursery.cancel_scope.cancel()
            assert transport.listen_addresses() == []
            with socket.socket() as again:
                again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                again.bind(("127.0.0.1", port))  # nothing listens there any more
            with pytest.raises(UnreachableError):
                await _answers(client, f"127.0.0.1:{port}", Ack())
