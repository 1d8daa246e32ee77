"""Signature checks in worker processes: right answers, and right answers still when workers die."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from dag import SigningKey
from dag.sigworker import check_items
from dag.verifier import SignatureItem, SignatureProcesses
from tests.conftest import InstanceFactory
from tests.histories import history, raws

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))


def _items(count: int) -> tuple[list[SignatureItem], list[bool]]:
    """Every third signature is by another key, every fifth message was changed after signing."""
    items: list[SignatureItem] = []
    expected: list[bool] = []
    for i in range(count):
        message = os.urandom(50 + i)
        signer = OTHER if i % 3 == 0 else KEY
        signature = signer.sign(message)
        if i % 5 == 0:
            message = message[:-1] + bytes([message[-1] ^ 1])
        items.append((KEY.pubkey_bytes, message, signature))
        expected.append(i % 3 != 0 and i % 5 != 0)
    return items, expected


@pytest.fixture
def processes() -> Iterator[SignatureProcesses]:
    workers = SignatureProcesses(2)
    try:
        yield workers
    finally:
        workers.close()


def test_workers_answer_like_local_checks(processes: SignatureProcesses) -> None:
    items, expected = _items(40)
    assert processes.check(items) == expected
    assert processes.check([]) == []
    assert processes.alive == 2


def test_a_dead_worker_is_dropped_and_its_checks_done_here(processes: SignatureProcesses) -> None:
    items, expected = _items(20)
    for process in processes.processes:
        process.kill()
        process.wait()
    assert processes.check(items) == expected  # the first dies on use: checked here
    assert processes.check(items) == expected  # so does the second
    assert processes.alive == 0
    assert processes.check(items) == expected  # none left: every check is local


def test_after_close_checks_are_local_and_workers_have_exited(processes: SignatureProcesses) -> None:
    items, expected = _items(10)
    processes.close()
    assert all(process.poll() is not None for process in processes.processes)
    assert processes.check(items) == expected


def test_a_malformed_key_or_signature_is_answered_without_a_worker(processes: SignatureProcesses) -> None:
    items, _ = _items(3)
    bad = [*items, (b"short", b"message", b"x" * 64)]
    assert processes.check(bad)[-1] is False
    assert processes.alive == 2


def test_worker_protocol_survives_a_truncated_item() -> None:
    message = b"hello"
    signature = KEY.sign(message)
    good = KEY.pubkey_bytes + signature + len(message).to_bytes(4, "big") + message
    lying = KEY.pubkey_bytes + signature + (1000).to_bytes(4, "big") + message  # claims more than it holds
    assert check_items(good + lying) == b"\x01\x00"


def test_an_instance_with_worker_processes_verifies_and_refuses(make_instance: InstanceFactory) -> None:
    db = history(make_instance(), 150, keys=1)
    entries = raws(db)
    target = make_instance()
    assert target.use_signature_processes(2) == 2
    result = target.put_remote_entries(target.prepare_remote_entries(entries))
    assert len(result.verified) == len(entries)
    assert target.open_database(db.id).doc("d").get("k0") == 149
    workers = list(target.signature_processes.processes)  # type: ignore[union-attr]
    target.close()
    assert all(process.poll() is not None for process in workers)


def test_a_stuck_worker_is_dropped_after_its_deadline(
    processes: SignatureProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from dag import verifier

    monkeypatch.setattr(verifier, "ANSWER_TIMEOUT_S", 0.3)
    items, expected = _items(6)
    # Over a pipe's 64 KiB: the write itself blocks on a worker that stopped reading.
    message = os.urandom(40_000)
    items += [(KEY.pubkey_bytes, message, KEY.sign(message))] * 3
    expected += [True] * 3
    for process in processes.processes:
        os.kill(process.pid, signal.SIGSTOP)  # alive, but never answers
    try:
        assert processes.check(items) == expected
        assert processes.alive == 1
    finally:
        for process in processes.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
