"""Build the sync hook tests' answers (requests-mock), errors and assertions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from hook_api import API, TOKEN
from hook_api import prediction_json as api_prediction_json
from urllib3.exceptions import MaxRetryError, NewConnectionError

from airflow_provider_kontext.exceptions import FluxKontextError

VERSION = "a" * 64


def prediction_json(status: str = "starting", **fields: Any) -> dict[str, Any]:
    return api_prediction_json(status, **{"created_at": "2025-06-01T10:00:00Z", **fields})


ACCOUNT_JSON = {"type": "user", "username": "alice", "name": "Alice Example", "github_url": None}


FILE_JSON = {
    "id": "file-1",
    "name": "cat.png",
    "content_type": "image/png",
    "size": 4,
    "urls": {"get": f"{API}/v1/files/file-1"},
    "expires_at": "2025-06-02T10:00:00Z",
}


def refused() -> requests.exceptions.ConnectionError:
    """Return what requests raises when nothing listens on the port: the request never left."""
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(None, "/v1/x", reason=reason))  # type: ignore[arg-type]


def reset() -> requests.exceptions.ConnectionError:
    """Return what requests raises when the server drops the connection after the request was written."""
    return requests.exceptions.ConnectionError(
        "('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))"
    )


def raised(call: Callable[[], Any], kind: type[BaseException] = FluxKontextError) -> Any:
    with pytest.raises(kind) as info:
        call()
    return info.value


def assert_no_secret(*texts: Any) -> None:
    for text in texts:
        assert TOKEN not in str(text)
        assert TOKEN[:10] not in str(text)
