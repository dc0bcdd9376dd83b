"""Test the connection's one table of settings and what is made from it.

The connection's one table of settings and what is made from it: ClientSettings, the form, the
docs' connection page; the hook owning the connection metadata; the hints that name the form's fields.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_kontext.compat import hook_field_behaviour
from airflow_provider_kontext.exceptions import FluxKontextAuthError, FluxKontextTransportError
from airflow_provider_kontext.get_provider_info import get_provider_info
from airflow_provider_kontext.hooks.api import account_request, parse_response
from airflow_provider_kontext.hooks.connection import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    SETTINGS,
    TOKEN_LABEL,
    ClientSettings,
    Setting,
    normalize_base_url,
    tls_hint,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "airflow_provider_kontext"


def _num(value: float) -> str:
    return f"{value:g}"


def _docs_row(setting: Setting) -> str:
    return (
        f"| `{setting.name}` | {_num(setting.default)} | {_num(setting.minimum)} "
        f"| {setting.label}: {setting.help} |"
    )


def _conn_fields() -> dict[str, Any]:
    (conn,) = get_provider_info()["connection-types"]
    fields: dict[str, Any] = conn["conn-fields"]
    return fields


# --- one table ----------------------------------------------------------------------------------


def test_client_settings_defaults_are_the_tables() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ClientSettings)}
    for setting in SETTINGS:
        assert defaults[setting.name] == setting.default, setting.name
        assert type(defaults[setting.name]) is setting.type, setting.name


def test_form_fields_are_the_tables() -> None:
    fields = _conn_fields()
    assert list(fields) == [setting.name for setting in SETTINGS]
    for setting in SETTINGS:
        schema = fields[setting.name]["schema"]
        assert fields[setting.name]["label"] == setting.label
        # Neither default nor minimum: the form saved every default and clamped 0 to the minimum.
        assert "default" not in schema
        assert "minimum" not in schema
        assert (
            f"Empty: {setting.default:g}; at least {setting.minimum:g}."
            in fields[setting.name]["description"]
        )
        assert schema["type"][0] == ("integer" if setting.type is int else "number")


def test_docs_table_is_the_tables() -> None:
    """The connection page's extras table, row by row, is the table (edit both, or this fails)."""
    page = (ROOT / "docs" / "connection.md").read_text()
    section = page[page.index("## Extras") :]
    section = section[: section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows == [_docs_row(setting) for setting in SETTINGS]


def test_readme_sends_readers_to_the_docs_table() -> None:
    """The README keeps no copy of the extras (one table, one page) and links to the page's."""
    readme = (ROOT / "README.md").read_text()
    assert "](docs/connection.md#extras)" in readme
    assert not any(f"| `{setting.name}` |" in readme for setting in SETTINGS)


def test_every_setting_is_documented_on_the_hook() -> None:
    doc = FluxKontextHook.__doc__ or ""
    for setting in SETTINGS:
        assert f"``{setting.name}``" in doc


def test_placeholder_names_only_real_extras() -> None:
    placeholder = FluxKontextHook.get_ui_field_behaviour()["placeholders"]["extra"]
    example = json.loads(placeholder)
    assert set(example) <= {setting.name for setting in SETTINGS}
    assert all(example[setting.name] == setting.default for setting in SETTINGS if setting.name in example)


def test_defaults_come_from_the_table_when_extras_are_empty() -> None:
    conn = _Conn(extra={name: "" for name in ("timeout", "backoff_base")})
    settings = ClientSettings.from_connection(conn)
    assert settings == ClientSettings(conn_id="c", base_url="https://api.replicate.com")


def test_backoff_base_is_read() -> None:
    settings = ClientSettings.from_connection(_Conn(extra={"backoff_base": "0.25"}))
    assert settings.backoff_base == 0.25


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_below_the_minimum_names_the_extra(setting: Setting) -> None:
    with pytest.raises(ValueError, match=f"connection extra '{setting.name}' must be at least"):
        ClientSettings.from_connection(_Conn(extra={setting.name: setting.minimum - 0.01}))


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"max_retries": 2.5}, "'max_retries' must be a whole number, got 2.5"),
        ({"max_retries": "2.5"}, "'max_retries' must be a whole number"),
        ({"list_min_waits": 1.5}, "'list_min_waits' must be a whole number"),
        ({"timeout": 0}, "'timeout' must be at least 1, got 0 .*leave it empty for the default, 30"),
        ({"connect_timeout": "nan"}, "'connect_timeout' must be a finite number"),
        ({"backoff_max": "inf"}, "'backoff_max' must be a finite number"),
    ],
)
def test_a_bad_extra_is_refused_with_the_reason_not_rounded(extra: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ClientSettings.from_connection(_Conn(extra=extra))


def test_whole_numbers_written_as_floats_are_fine() -> None:
    assert ClientSettings.from_connection(_Conn(extra={"max_retries": 3.0})).max_retries == 3


def test_default_port_adds_nothing() -> None:
    assert normalize_base_url("https://api.replicate.com", 443) == "https://api.replicate.com"
    assert normalize_base_url("http://proxy.example", 80) == "http://proxy.example"
    assert normalize_base_url("http://proxy.example", 8080) == "http://proxy.example:8080"


# --- metadata is metadata -----------------------------------------------------------------------


def test_hook_owns_the_connection_metadata() -> None:
    (conn,) = get_provider_info()["connection-types"]
    assert conn["connection-type"] == FluxKontextHook.conn_type == CONN_TYPE
    assert conn["hook-name"] == FluxKontextHook.hook_name
    assert FluxKontextHook.default_conn_name == DEFAULT_CONN_ID
    # The same behaviour, in the hook method's spelling (hidden_fields where the declarative form
    # says hidden-fields).
    assert hook_field_behaviour(conn["ui-field-behaviour"]) == FluxKontextHook.get_ui_field_behaviour()


def test_no_runtime_module_imports_provider_info() -> None:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name.endswith("get_provider_info") for name in names):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == []


def test_provider_info_stays_cheap() -> None:
    """ProvidersManager loads it in every process: no HTTP library, pydantic or Airflow import."""
    code = (
        "import sys\n"
        "from airflow_provider_kontext.get_provider_info import get_provider_info\n"
        "get_provider_info()\n"
        "heavy = ('aiohttp', 'requests', 'httpx', 'pydantic', 'airflow', 'tenacity')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_conn_type_round_trips_through_a_uri_without_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """``_`` is no URI scheme character (Airflow warns) and ``-`` is read back as ``_``."""
    from airflow.models.connection import Connection

    assert "_" not in CONN_TYPE
    assert "-" not in CONN_TYPE
    conn = Connection(conn_id="c", conn_type=CONN_TYPE, host="https://proxy.example/replicate", password="p")
    with caplog.at_level(logging.WARNING):
        uri = conn.get_uri()
    assert "RFC3986" not in caplog.text
    back = Connection(conn_id="c", uri=uri)
    assert (back.conn_type, back.host, back.password) == (CONN_TYPE, conn.host, "p")


# --- hints that name the form's fields ----------------------------------------------------------


def test_auth_hint_names_the_forms_token_field() -> None:
    settings = ClientSettings(conn_id="kontext_prod", base_url="https://api.replicate.com", token="r8_secret")
    with pytest.raises(FluxKontextAuthError) as err:
        parse_response(settings, account_request(), 401, {}, b'{"title": "Unauthenticated"}')
    assert f"its {TOKEN_LABEL!r} field" in str(err.value)
    assert "password" not in str(err.value)


class _Conn:
    def __init__(self, host: str | None = None, port: int | None = None, extra: Any = None) -> None:
        self.conn_id = "c"
        self.host = host
        self.port = port
        self.password = None
        self.extra_dejson = extra or {}


@pytest.fixture
def plain_http_server() -> Iterator[str]:
    """``host:port`` of a loopback server that answers anything, a TLS hello too, with a plain 400."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            with client:
                client.settimeout(5)
                try:
                    client.recv(4096)
                    client.sendall(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def _set(**fields: Any) -> None:
        value = json.dumps({"conn_type": CONN_TYPE, **fields})
        monkeypatch.setenv(f"AIRFLOW_CONN_{DEFAULT_CONN_ID.upper()}", value)

    return _set


def test_scheme_less_host_against_plain_http_says_did_you_mean(
    plain_http_server: str, set_conn: Callable[..., None]
) -> None:
    set_conn(host=plain_http_server, password="r8_secret_token")
    with pytest.raises(FluxKontextTransportError) as err:
        FluxKontextHook(max_retries=0).get_account()
    assert f"did you mean 'http://{plain_http_server}'?" in str(err.value)
    assert "r8_secret_token" not in str(err.value)


def test_scheme_less_host_against_plain_http_says_did_you_mean_async(
    plain_http_server: str, set_conn: Callable[..., None]
) -> None:
    set_conn(host=plain_http_server)

    async def account() -> None:
        async with FluxKontextHook(max_retries=0) as hook:
            await hook.aget_account()

    with pytest.raises(FluxKontextTransportError) as err:
        asyncio.run(account())
    assert f"did you mean 'http://{plain_http_server}'?" in str(err.value)


def test_no_hint_where_the_scheme_was_written(plain_http_server: str, set_conn: Callable[..., None]) -> None:
    set_conn(host=f"https://{plain_http_server}")
    with pytest.raises(FluxKontextTransportError) as err:
        FluxKontextHook(max_retries=0).get_account()
    assert "did you mean" not in str(err.value)


def test_no_hint_for_other_failures() -> None:
    settings = ClientSettings.from_connection(_Conn(host="127.0.0.1:1"))
    assert settings.assumed_https
    assert tls_hint(settings, ConnectionRefusedError("refused")) is None
    wrapped = OSError("outer")
    wrapped.__cause__ = __import__("ssl").SSLError(1, "WRONG_VERSION_NUMBER")
    assert tls_hint(settings, wrapped) is not None
