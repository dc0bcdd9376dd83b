"""Build the async hook tests' answers, errors and assertions."""

from __future__ import annotations

from typing import Any

import pytest
from hook_api import API, TOKEN
from scripted_api import FakeApi

from airflow_provider_kontext.exceptions import FluxKontextError

VERSION = "b" * 64


ACCOUNT_JSON = {"type": "user", "username": "alice", "name": "Alice Example"}


FILE_JSON = {"id": "file-1", "size": 4, "urls": {"get": f"{API}/v1/files/file-1"}}


async def araised(coro: Any, kind: type[BaseException] = FluxKontextError) -> Any:
    with pytest.raises(kind) as info:
        await coro
    return info.value


def assert_no_secret(*texts: Any) -> None:
    for text in texts:
        assert TOKEN not in str(text)
        assert TOKEN[:10] not in str(text)


def read_timeout(api: FakeApi) -> float | None:
    """Return the read timeout the client set for the last request."""
    return api.timeouts[-1].sock_read
