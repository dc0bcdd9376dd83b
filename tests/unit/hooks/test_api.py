"""Test the URL a download shows in the task log and in errors: a working link without secrets.

The URL a download shows in the task log and in errors: a working link (host and port kept),
without the user info, query or fragment that may carry a secret.
"""

from __future__ import annotations

import pytest

from airflow_provider_kontext.hooks.api import download_request
from airflow_provider_kontext.hooks.connection import ClientSettings

SETTINGS = ClientSettings(conn_id="c", base_url="http://127.0.0.1:8123", token="r8_DownloadUrlTest_0c1d")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8123/files/out.png?sig=abc", "http://127.0.0.1:8123/files/out.png"),
        ("https://user:pw@cdn.example:8443/x/out.webp#frag", "https://cdn.example:8443/x/out.webp"),
        ("http://[::1]:9000/files/out.png", "http://[::1]:9000/files/out.png"),
        ("https://replicate.delivery/xezq/out.webp", "https://replicate.delivery/xezq/out.webp"),
    ],
)
def test_the_shown_url_keeps_the_port_and_drops_what_may_be_secret(url: str, shown: str) -> None:
    request = download_request(SETTINGS, url)
    assert request.path == shown
    assert request.label == f"GET {shown}"


def test_the_token_goes_only_to_the_same_origin_port_included() -> None:
    assert download_request(SETTINGS, "http://127.0.0.1:8123/files/a.png").headers
    assert not download_request(SETTINGS, "http://127.0.0.1:9999/files/a.png").headers
