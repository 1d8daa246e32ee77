"""The tests' waiting helper: it returns what it waited for, and its failure says what that was."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import trio

from tests.waiting import until, until_awaited, wait_until


def test_wait_until_returns_the_value_that_satisfied_it() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter), "three", timeout_s=5, poll_s=0, done=lambda n: n >= 3) == 3


def test_wait_until_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"the flag not reached in 0\.05 s; last seen: 0\n.*stderr here"):
        wait_until(lambda: 0, "the flag", timeout_s=0.05, poll_s=0.01, detail=lambda: "stderr here")


async def test_until_gives_up_before_the_enclosing_deadline_with_its_own_message() -> None:
    with trio.fail_after(1), pytest.raises(AssertionError, match="the hello not reached"):
        await until(lambda: False, "the hello")


async def test_until_awaited_cancels_a_probe_still_running_at_the_bound() -> None:
    async def hangs() -> bool:
        await trio.sleep_forever()

    with pytest.raises(AssertionError, match="last seen: 'nothing"):
        await until_awaited(hangs, "an answer", timeout_s=0.05)


async def test_an_unbounded_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="needs timeout_s"):
        await until(lambda: True, "anything")


def test_until_runs_under_another_loop_with_its_pause() -> None:
    counter = itertools.count()

    async def scenario() -> int:
        return await until(
            lambda: next(counter), "two", timeout_s=5, done=lambda n: n >= 2, pause=lambda: asyncio.sleep(0)
        )

    assert asyncio.run(scenario()) == 2
