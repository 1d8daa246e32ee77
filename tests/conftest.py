"""Shared fixtures: every dag test runs against both storage backends; and the one check
that the namespace tests make before building a topology."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dag import Instance, SigningKey
from scripts.netns import skip_reason

InstanceFactory = Callable[..., Instance]


@pytest.fixture(params=["memory", "sqlite"])
def make_instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InstanceFactory]:
    """``make_instance()`` returns a new, empty instance on the parametrized backend."""
    opened: list[Instance] = []
    counter = iter(range(1_000_000))

    def factory(key: SigningKey | None = None) -> Instance:
        if request.param == "memory":
            instance = Instance.in_memory(key)
        else:
            instance = Instance.open(tmp_path / f"node{next(counter)}")
        opened.append(instance)
        return instance

    yield factory
    for instance in opened:
        instance.close()


@pytest.fixture
def instance(make_instance: InstanceFactory) -> Instance:
    return make_instance()


def require_netns() -> None:
    """Skip a test that needs network namespaces where they cannot be built, but fail it when
    ``EIDETICA_REQUIRE_NETNS`` is set: CI, as root, insists that these tests really run."""
    reason = skip_reason()
    if reason is None:
        return
    if os.environ.get("EIDETICA_REQUIRE_NETNS"):
        pytest.fail(f"EIDETICA_REQUIRE_NETNS is set but: {reason}")
    pytest.skip(reason)
