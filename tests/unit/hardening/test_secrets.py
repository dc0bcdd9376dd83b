"""Test secrets in process: registered with the masker, shown in no repr, message or log line.

Secrets, in process: the API token, and a token carried in a proxy URL's userinfo or query, are
registered with Airflow's secret masker and appear in no repr, no exception message and no log line
this provider writes, whatever the server echoes back. (``tests/e2e/test_secrets.py`` checks the same
through whole DAG runs: task and trigger logs, XCom, trigger rows, rendered fields.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.exceptions import FluxKontextError
from airflow_provider_kontext.hooks.api import (
    download_request,
    get_prediction_request,
    parse_response,
)
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.transports import requests_error, transport_error
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

from .test_server import ScriptedServer, response

TOKEN = "r8_HardeningCanary_5f0c2e9b7a"
URL_PASSWORD = "pw_HardeningCanary_71d4"
URL_USER_TOKEN = "ut_HardeningCanary_c3a8"
QUERY_TOKEN = "qk_HardeningCanary/9e+2"  # needs percent-encoding in a URL
CONN_ID = "kontext_secrets"
PID = "secret0test0prediction"

#: Tokens as they are written in practice, and awkward ones.
TOKENS = st.one_of(
    st.from_regex(r"r8_[A-Za-z0-9]{20,40}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40),
)


def forms(secret: str, partial: bool) -> set[str]:
    """Return the forms a secret may take in a message.

    A secret as it may appear in a message: as given, percent-encoded, and (``partial``) its
    longer two thirds, as a message cut at a length limit would show them.
    """
    found = {secret, quote(secret, safe="")}
    if partial:
        found |= {secret[: len(secret) * 2 // 3], secret[len(secret) // 3 :]}
    return found


def assert_hidden(secrets: list[str], *texts: str, partial: bool = True) -> None:
    for text in texts:
        for secret in secrets:
            for form in forms(secret, partial):
                assert form not in text, f"{form!r} shown in {text[:300]!r}"


def proxy_url(base: str, *, user_only: bool = False) -> str:
    host = base.removeprefix("http://")
    userinfo = URL_USER_TOKEN if user_only else f"kontext:{URL_PASSWORD}"
    return f"http://{userinfo}@{host}/replicate?key={quote(QUERY_TOKEN, safe='')}&region=eu"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: None)
        yield srv


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def set_conn(**fields: Any) -> None:
        fields.setdefault("extra", {"max_retries": 1, "timeout": 1, "connect_timeout": 1})
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "fluxkontext", **fields})
        )

    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    return set_conn


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Return what this provider logs, at DEBUG.

    What this provider logs, at DEBUG. (urllib3's own DEBUG lines quote the request path with its
    query: in Airflow the secret masker hides those, once the hook has registered the secrets, which
    ``test_the_real_masker_hides_them_once_the_hook_has_its_settings`` and the e2e test check.)
    """
    caplog.set_level(logging.DEBUG)

    def read() -> str:
        out = capsys.readouterr()
        ours = [r.getMessage() for r in caplog.records if not r.name.startswith(("urllib3", "asyncio"))]
        return "\n".join(ours) + out.out + out.err

    return read


# --- what counts as a secret, and redaction ----------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    token=TOKENS, place=st.sampled_from(["password", "user", "query", "token"]), noise=st.text(max_size=30)
)
def test_every_form_of_a_secret_is_redacted(token: str, place: str, noise: str) -> None:
    encoded = quote(token, safe="")
    base = {
        "password": f"https://kontext:{encoded}@proxy.example/replicate",
        "user": f"https://{encoded}@proxy.example/replicate",
        "query": f"https://proxy.example/replicate?key={encoded}",
        "token": "https://proxy.example/replicate",
    }[place]
    settings_ = ClientSettings(
        conn_id="c", base_url=base, token=token if place == "token" else "r8_other_token_value"
    )
    # A token in the Authorization header is sent as it is; one in the URL also percent-encoded.
    shown = [token] if place == "token" else [token, encoded]
    if len(token) >= 6:
        message = f"{noise} {' '.join(shown)} {base} {noise}"
        redacted = settings_.redact(message)
        for form in shown:
            assert form not in redacted.replace("***", "\x00")
        assert set(shown) <= set(settings_.secrets())
    assert_hidden([token, "r8_other_token_value"], repr(settings_), str(settings_), partial=False)


def test_a_download_request_with_the_token_has_no_token_in_its_repr() -> None:
    """The token rides in the headers of a download from the API's own origin: never in a repr."""
    settings_ = ClientSettings(conn_id="c", base_url="https://api.example", token=TOKEN)
    request = download_request(settings_, "https://api.example/files/out.png?sig=abc")
    assert request.headers == {"Authorization": f"Bearer {TOKEN}"}
    assert_hidden([TOKEN], repr(request), str(request))


@settings(max_examples=300, deadline=None, database=None)
@given(
    status=st.sampled_from([200, 400, 401, 403, 404, 422, 429, 500, 502, 503]),
    where=st.sampled_from(["title", "detail", "error", "message", "html", "text", "cut", "nested"]),
    padding=st.integers(0, 1200),
)
def test_a_token_echoed_by_the_server_is_never_shown(status: int, where: str, padding: int) -> None:
    settings_ = ClientSettings(conn_id="c", base_url="https://api.example", token=TOKEN)
    echo = "x" * padding + f"Bearer {TOKEN}"
    body = {
        "title": json.dumps({"title": echo}),
        "detail": json.dumps({"detail": echo}),
        "error": json.dumps({"error": echo}),
        "message": json.dumps({"message": echo}),
        "html": f"<html><title>{echo}</title></html>",
        "text": echo,
        "cut": echo + "y" * 5000,
        "nested": json.dumps({"detail": {"headers": {"authorization": echo}}}),
    }[where].encode()
    request = get_prediction_request(PID)
    try:
        parse_response(settings_, request, status, {"content-type": "text/html"}, body)
    except FluxKontextError as exc:
        assert_hidden(
            [TOKEN], str(exc), repr(exc), str(getattr(exc, "detail", "")), str(getattr(exc, "title", ""))
        )


def test_transport_errors_that_quote_the_url_are_redacted() -> None:
    import aiohttp
    import requests

    base = proxy_url("http://127.0.0.1:9")
    settings_ = ClientSettings(conn_id="c", base_url=base, token=TOKEN)
    request = get_prediction_request(PID)
    full = settings_.url(request.path)
    for exc in (
        requests.exceptions.ConnectionError(f"HTTPConnectionPool: Max retries exceeded with url: {full}"),
        requests.exceptions.ReadTimeout(f"Read timed out. (read timeout=1) {full} Bearer {TOKEN}"),
    ):
        error = requests_error(settings_, request, exc)
        assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], str(error), repr(error))
    for aio_exc in (
        aiohttp.ClientPayloadError(f"error reading {full}"),
        aiohttp.ServerDisconnectedError(f"{full} Bearer {TOKEN}"),
    ):
        error = transport_error(settings_, request, aio_exc, sent=True)
        assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], str(error), repr(error))


# --- registration with Airflow's masker ------------------------------------------------------------


@pytest.mark.parametrize("user_only", [False, True], ids=["user-password", "token-as-user"])
def test_every_secret_is_registered_with_the_masker(conn: Callable[..., None], user_only: bool) -> None:
    conn(host=proxy_url("http://127.0.0.1:9", user_only=user_only), password=TOKEN)
    expected = {TOKEN, QUERY_TOKEN, URL_USER_TOKEN if user_only else URL_PASSWORD}
    with mock.patch("airflow_provider_kontext.compat.mask_secret") as masked:
        FluxKontextHook(CONN_ID).settings
    assert expected <= {c.args[0] for c in masked.call_args_list if isinstance(c.args[0], str)}

    async def load() -> None:
        await FluxKontextHook(CONN_ID).aget_settings()

    with (
        mock.patch("airflow_provider_kontext.compat.mask_secret") as masked,
        mock.patch("airflow_provider_kontext.compat.amask_secret", new_callable=mock.AsyncMock) as amasked,
    ):
        asyncio.run(load())
    calls = masked.call_args_list + amasked.call_args_list
    assert expected <= {c.args[0] for c in calls if isinstance(c.args[0], str)}


def test_the_real_masker_hides_them_once_the_hook_has_its_settings(conn: Callable[..., None]) -> None:
    from airflow.sdk._shared.secrets_masker import redact

    conn(host=proxy_url("http://127.0.0.1:9"), password=TOKEN)
    FluxKontextHook(CONN_ID).settings
    shown = redact(f"token={TOKEN} url={proxy_url('http://127.0.0.1:9')} q={QUERY_TOKEN}")
    assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], str(shown))


# --- reprs, logs and messages of whole calls -------------------------------------------------------


def test_hook_and_settings_reprs(conn: Callable[..., None]) -> None:
    conn(host=proxy_url("http://127.0.0.1:9"), password=TOKEN)
    hook = FluxKontextHook(CONN_ID)
    assert_hidden(
        [TOKEN, URL_PASSWORD, QUERY_TOKEN], repr(hook), str(hook), repr(hook.settings), str(hook.settings)
    )


@pytest.mark.parametrize("user_only", [False, True], ids=["user-password", "token-as-user"])
def test_a_failing_run_through_a_proxy_url_shows_no_secret(
    server: ScriptedServer, conn: Callable[..., None], logs: Callable[[], str], user_only: bool
) -> None:
    """Sync and async: errors echoing everything, retries logged at DEBUG, the final exception.

    No token besides the URL's (with both, aiohttp refuses to send the request at all: see
    ``test_a_proxy_url_with_userinfo_and_a_token``).
    """
    conn(host=proxy_url(server.base_url, user_only=user_only))
    echo = f"you sent {proxy_url(server.base_url, user_only=user_only)}"
    server.script(
        response(503, json.dumps({"title": echo, "detail": echo})),
        response(401, f"<html><title>{echo}</title></html>", "text/html"),
    )
    with pytest.raises(FluxKontextError) as sync_error:
        FluxKontextHook(CONN_ID).get_prediction(PID)
    assert server.seen[0].path.startswith("/replicate/v1/predictions/")  # the proxy URL was really used

    async def poll() -> None:
        async with FluxKontextHook(CONN_ID) as hook:
            await hook.aget_prediction(PID)

    server.script(response(503, json.dumps({"title": echo, "detail": echo})))
    with pytest.raises(FluxKontextError) as async_error:
        asyncio.run(poll())
    text = logs()
    assert "attempt 1 failed" in text  # the retries were logged
    secrets = [QUERY_TOKEN, URL_USER_TOKEN if user_only else URL_PASSWORD]
    assert_hidden(secrets, text, str(sync_error.value), repr(sync_error.value), str(async_error.value))


def test_a_proxy_url_with_userinfo_and_a_token(
    server: ScriptedServer, conn: Callable[..., None], logs: Callable[[], str]
) -> None:
    """Check that a proxy URL's credentials beside the token show no secret, whatever each path does.

    Both credentials cannot ride in one Authorization header. Whatever each path does about it
    (requests sends the URL's as Basic auth; aiohttp refuses to send), no secret is shown.
    """
    conn(host=proxy_url(server.base_url), password=TOKEN)
    server.script(response(200, json.dumps({"id": PID, "status": "processing"})))
    try:
        FluxKontextHook(CONN_ID).get_prediction(PID)
    except FluxKontextError as exc:
        assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], str(exc))

    async def poll() -> None:
        async with FluxKontextHook(CONN_ID) as hook:
            await hook.aget_prediction(PID)

    try:
        asyncio.run(poll())
    except (FluxKontextError, ValueError) as exc:
        assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], str(exc), repr(exc))
    assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], logs())


def test_an_unreachable_proxy_url_shows_no_secret(conn: Callable[..., None], logs: Callable[[], str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connection refused
    conn(host=proxy_url(f"http://127.0.0.1:{port}"), password=TOKEN)
    with pytest.raises(FluxKontextError) as info:
        FluxKontextHook(CONN_ID).get_prediction(PID)
    assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], str(info.value), repr(info.value), logs())


def test_trigger_kwargs_and_repr_hold_no_secret(conn: Callable[..., None]) -> None:
    conn(host=proxy_url("http://127.0.0.1:9"), password=TOKEN)
    trigger = FluxKontextPredictionTrigger(
        PID, CONN_ID, poll_interval=1, end_time=1e10, hook_params={"timeout": 5, "max_retries": 1}
    )
    classpath, kwargs = trigger.serialize()
    hook_params = kwargs.pop("hook_params")  # settings only: numbers by name
    assert hook_params == {"timeout": 5, "max_retries": 1}
    assert all(isinstance(v, str | int | float | bool) or v is None for v in kwargs.values())
    assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], json.dumps(kwargs), repr(trigger), classpath)


def test_a_token_echoed_into_a_failed_predictions_error_does_not_reach_the_event() -> None:
    settings = ClientSettings(conn_id=CONN_ID, base_url=proxy_url("https://proxy.example"), token=TOKEN)
    prediction = Prediction.model_validate(
        {"id": PID, "status": "failed", "error": f"proxy: bad header Bearer {TOKEN}", "logs": f"{TOKEN}\n"}
    )
    assert_hidden(
        [TOKEN, URL_PASSWORD, QUERY_TOKEN],
        json.dumps(prediction_event(prediction, settings.redact).payload()),
    )


def test_test_connection_does_not_show_the_proxy_urls_secrets(
    server: ScriptedServer, conn: Callable[..., None]
) -> None:
    conn(host=proxy_url(server.base_url), password=TOKEN)
    server.script(response(200, json.dumps({"type": "user", "username": "alice"})))
    ok, message = FluxKontextHook(CONN_ID).test_connection()
    assert ok
    assert_hidden([TOKEN, URL_PASSWORD, QUERY_TOKEN], message)
