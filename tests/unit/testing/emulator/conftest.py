"""Provide the emulator tests' fixtures: fast emulator options and an HTTP session that ignores proxies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .helpers import (
    FAST,
)


@pytest.fixture
def kontext_emulator_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Fast defaults for every test here, plus what :func:`emulator_options` asks for."""
    return {**FAST, **getattr(request, "param", {})}


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: straight to 127.0.0.1
        yield session
