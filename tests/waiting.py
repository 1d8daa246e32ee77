"""Waiting in tests for what another task, process or node does: one bounded polling loop that
says, when it gives up, what it waited for and what it last saw.

A test cannot know when a sync lands, a status changes or a screen shows, only how long is too
long. So every wait names its bound and says in words what it waits for, and a failure reads
``b's hello not reached in 20 s; last seen: False`` rather than a bare ``TooSlowError`` from
the test's ``fail_after`` with no word of which of its waits hung.

- :func:`wait_until` blocks (tests driving processes with ``subprocess``);
- :func:`until` and :func:`until_awaited` run under trio (``trio.sleep`` between probes), or
  under another loop if the caller passes ``pause`` (the TUI tests' ``pilot.pause``);
  ``until_awaited`` for a probe that itself awaits (a command to a node process).

Under trio ``timeout_s`` may be left out: the wait then takes the enclosing deadline (the
test's ``fail_after``) and gives up :data:`MARGIN_S` before it, so that its own message, not
the enclosing scope's, reports the failure.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

MARGIN_S = 0.25
"""How long before an enclosing trio deadline a wait without ``timeout_s`` gives up."""


def _failure(what: str, timeout_s: float, last: object, detail: Callable[[], str] | None) -> AssertionError:
    message = f"{what} not reached in {timeout_s:.3g} s; last seen: {last!r}"
    if detail is not None:
        message += "\n" + detail()
    return AssertionError(message)


def wait_until(
    probe: Callable[[], T],
    what: str,
    *,
    timeout_s: float,
    poll_s: float = 0.1,
    done: Callable[[T], object] = bool,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``probe()`` every ``poll_s`` until ``done(value)`` holds and return that value.

    Gives up after ``timeout_s`` with an ``AssertionError`` naming ``what``, the last value
    and, if given, ``detail()`` (a node's stderr, say), read only on failure.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise _failure(what, timeout_s, value, detail)
        time.sleep(poll_s)


async def until_awaited(
    probe: Callable[[], Awaitable[T]],
    what: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.02,
    done: Callable[[T], object] = bool,
    detail: Callable[[], str] | None = None,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """:func:`wait_until` for a probe that awaits; between probes ``pause()`` if given, else
    ``trio.sleep(poll_s)``. Under trio a probe still running at the bound is cancelled."""
    now: Callable[[], float] = trio.current_time
    sleep: Callable[[], Awaitable[None]] = pause or (lambda: trio.sleep(poll_s))
    if pause is None:
        if timeout_s is None:
            enclosing = trio.current_effective_deadline()
            if math.isinf(enclosing):
                raise ValueError(f"waiting for {what} needs timeout_s or an enclosing deadline")
            timeout_s = max(0.0, enclosing - MARGIN_S - now())
    elif timeout_s is None:
        raise ValueError(f"waiting for {what} outside trio needs timeout_s")
    else:
        now = time.monotonic
    deadline = now() + timeout_s
    last: object = "nothing (the first probe did not finish)"
    bound: contextlib.AbstractContextManager[object] = (
        trio.move_on_at(deadline) if pause is None else contextlib.nullcontext()
    )
    with bound:
        while True:
            last = value = await probe()
            if done(value):
                return value
            if now() >= deadline:
                break
            await sleep()
    raise _failure(what, timeout_s, last, detail)


async def until(
    probe: Callable[[], T],
    what: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.02,
    done: Callable[[T], object] = bool,
    detail: Callable[[], str] | None = None,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """:func:`until_awaited` for a probe that does not await (a look at local state)."""

    async def awaitable_probe() -> T:
        return probe()

    return await until_awaited(
        awaitable_probe, what, timeout_s=timeout_s, poll_s=poll_s, done=done, detail=detail, pause=pause
    )
