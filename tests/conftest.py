"""Shared fixtures: every dag test runs against both storage backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dag import Instance, SigningKey

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
