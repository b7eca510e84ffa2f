"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Isolated, Services, isolated


@pytest.fixture
def iso(services: Services, tmp_path: Path) -> Iterator[Isolated]:
    """A deployment of the test's own (fresh database, its own Redis server)."""
    with isolated(services, tmp_path) as deployment:
        yield deployment
