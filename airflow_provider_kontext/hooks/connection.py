"""The ``fluxkontext`` connection: its type, form and settings, each stated once.

One table (:data:`SETTINGS`) lists the extras a connection may carry (name, type, default,
minimum, label, help). From it are made :class:`ClientSettings` and its
:meth:`~ClientSettings.from_connection`, the connection form (``conn-fields`` and the
``ui-field-behaviour`` of ``get_provider_info``, the hook's ``get_ui_field_behaviour``), and the
table of docs/connection.md is checked against it by a test. The error hints that name a form
field take the field's label from here too.

Imported by ``get_provider_info`` (which Airflow loads in every process that lists providers), so
it stays free of heavy imports: standard library only.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from airflow_provider_kontext.exceptions import exception_chain

#: The connection type. No ``_``: Airflow writes connections as URIs whose scheme is the type,
#: where ``_`` is not allowed (RFC 3986) and ``-`` is read back as ``_``.
CONN_TYPE = "fluxkontext"
DEFAULT_CONN_ID = "flux_kontext_default"
HOOK_NAME = "Flux Kontext"
HOOK_CLASS = "airflow_provider_kontext.hooks.kontext.FluxKontextHook"

DEFAULT_BASE_URL = "https://api.replicate.com"
TOKEN_ENV_VAR = "REPLICATE_API_TOKEN"  # noqa: S105 (the variable's name, not a token)
USER_AGENT = "airflow-provider-kontext"

#: The form's labels of the standard fields the connection uses.
HOST_LABEL = "Base URL"
TOKEN_LABEL = "API Token"  # noqa: S105 (a label, not a token)


@dataclass(frozen=True)
class Setting:
    """One connection extra: how it is read, checked and shown in the form and the docs."""

    name: str
    type: type[int] | type[float]
    default: float
    minimum: float
    label: str
    help: str

    def read(self, extras: Mapping[str, Any]) -> float:
        """Return the value in ``extras``, else the default.

        :raises ValueError: the value is not a number, or is below :attr:`minimum`; the message
            names the extra.
        """
        value = extras.get(self.name)
        if value in (None, ""):
            return self.default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"connection extra {self.name!r} must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"connection extra {self.name!r} must be a finite number, got {value!r}")
        if number < self.minimum:
            raise ValueError(
                f"connection extra {self.name!r} must be at least {self.minimum:g}, got {value!r} "
                f"({self.label}; leave it empty for the default, {self.default:g})"
            )
        if self.type is int and number != int(number):
            raise ValueError(
                f"connection extra {self.name!r} must be a whole number, got {value!r} ({self.label})"
            )
        return int(number) if self.type is int else number

    def describe(self) -> str:
        """Return the form's help text: what the extra does, its default and its least value."""
        return f"{self.help}. Empty: {self.default:g}; at least {self.minimum:g}."


#: Every extra of the connection, in the form's order.
SETTINGS: tuple[Setting, ...] = (
    Setting("timeout", float, 30.0, 1, "Read timeout (seconds)", "how long to wait for an answer"),
    Setting(
        "connect_timeout", float, 10.0, 0.1, "Connect timeout (seconds)", "how long to wait for a connection"
    ),
    Setting(
        "max_retries",
        int,
        5,
        0,
        "Retries of transient errors (429, 5xx, network)",
        "retries of one request; a create is retried only where it provably created nothing, and "
        "a throttled one (429) until its deadline (without one: max_retries x retry_after_max seconds)",
    ),
    Setting(
        "backoff_base",
        float,
        1.0,
        0,
        "First wait between retries (seconds)",
        "doubles with every retry (with jitter) up to the longest wait",
    ),
    Setting("backoff_max", float, 30.0, 0, "Longest wait between retries (seconds)", "caps the doubling"),
    Setting(
        "retry_after_max",
        float,
        60.0,
        0,
        "Longest wait a server's Retry-After may ask for (seconds)",
        "a longer Retry-After is cut to this",
    ),
    Setting(
        "max_requests_per_minute",
        float,
        2400.0,
        0,
        "Most requests per minute of the account per triggerer (0: no budget)",
        "a ceiling: each triggerer's budget starts at a quarter of it, doubles each second it is used "
        "until the first 429 or its share of Replicate's 3000/min (held 5 s), then adapts to the "
        "account's 429s, so several triggerers and other programs on one token share it untuned",
    ),
    Setting(
        "list_min_waits",
        int,
        2,
        0,
        "Waits that share one list request (0: never use the list)",
        "with at least this many waits of the account in one triggerer, their status is read from "
        "GET /v1/predictions, up to 100 per request, instead of one request each",
    ),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


def checked_overrides(values: Mapping[str, Any], source: str = "hook_params") -> dict[str, float]:
    """Return the settings in ``values`` that override the connection's extras (``None``: not set).

    The hook's keyword parameters, which operators, sensors and the trigger pass on as
    ``hook_params``: any name of :data:`SETTINGS`. Set in code rather than in a form, they need
    only make sense: positive where the extra's minimum is positive (a 0.2 s timeout is fine in a
    test), else not negative; whole numbers for counts.

    :raises ValueError: an unknown name (the allowed ones listed) or a bad value, naming ``source``.
    """
    from airflow_provider_kontext.models.arguments import check_number

    if not isinstance(values, Mapping):
        raise ValueError(f"{source} must be a dict, got {type(values).__name__}")
    if unknown := sorted(str(name) for name in values if name not in _BY_NAME):
        raise ValueError(f"{source}: unknown {', '.join(unknown)}; allowed: {', '.join(_BY_NAME)}")
    checked: dict[str, float] = {}
    for name, value in values.items():
        if value is None:
            continue
        setting = _BY_NAME[name]
        integer = setting.type is int
        number = check_number(
            f"{source} {name!r}", value, None if setting.minimum > 0 else 0, integer=integer
        )
        checked[name] = int(number) if integer else number
    return checked


def conn_fields() -> dict[str, Any]:
    """Return the form's extra fields as JSON schema (``conn-fields``, read by Airflow >= 3.2).

    No ``default`` and no ``minimum`` in the schema, on purpose: the form would save every default
    into the connection (empty must keep meaning "the provider's default", which may change), and
    its number input silently clamps a value below the minimum to it (``timeout`` 0 was saved as 1).
    The description names both; :meth:`Setting.read` refuses a bad value with the reason, and
    testing the connection reports it.
    """
    fields: dict[str, Any] = {}
    for setting in SETTINGS:
        kind = "integer" if setting.type is int else "number"
        fields[setting.name] = {
            "label": setting.label,
            "description": setting.describe(),
            "schema": {"type": [kind, "null"]},
        }
    return fields


def ui_field_behaviour() -> dict[str, Any]:
    """Return the hidden fields, labels and placeholders of the form (``ui-field-behaviour``)."""
    example = {"timeout": 30, "max_retries": 5}
    return {
        "hidden-fields": ["schema", "port", "login"],
        "relabeling": {"host": HOST_LABEL, "password": TOKEN_LABEL},
        "placeholders": {
            "host": f"{DEFAULT_BASE_URL} (or a Replicate-compatible proxy, e.g. https://proxy.example/replicate)",
            "password": f"r8_... (optional: falls back to {TOKEN_ENV_VAR}; some proxies need none)",
            "extra": "{" + ", ".join(f'"{name}": {value}' for name, value in example.items()) + "}",
        },
    }


def _default(name: str) -> Any:
    return _BY_NAME[name].default


@dataclass(frozen=True)
class ClientSettings:
    """Everything a request needs from the connection; defaults from :data:`SETTINGS`.

    ``token`` never shows in ``repr``. ``assumed_https`` records that the host had no scheme, for
    the hint of :func:`tls_hint`.
    """

    conn_id: str
    base_url: str
    token: str | None = field(default=None, repr=False)
    timeout: float = _default("timeout")
    connect_timeout: float = _default("connect_timeout")
    max_retries: int = _default("max_retries")
    backoff_base: float = _default("backoff_base")
    backoff_max: float = _default("backoff_max")
    retry_after_max: float = _default("retry_after_max")
    max_requests_per_minute: float = _default("max_requests_per_minute")
    list_min_waits: int = _default("list_min_waits")
    assumed_https: bool = field(default=False, compare=False)

    @classmethod
    def from_connection(cls, conn: Any, **overrides: float | None) -> ClientSettings:
        """Build settings from an Airflow ``Connection`` (sync or async lookup alike).

        ``host`` is the base URL (a scheme-less host means https); ``password`` the token, else the
        ``REPLICATE_API_TOKEN`` environment variable, else none (some proxies need none).
        ``overrides`` (the hook's parameters, e.g. ``timeout``, ``max_retries``) replace the extras
        of the same name; see :func:`checked_overrides`.

        :raises ValueError: an extra or override is not a number or is out of range (the message
            names it).
        """
        extras: Mapping[str, Any] = conn.extra_dejson or {}
        values: dict[str, Any] = {setting.name: setting.read(extras) for setting in SETTINGS}
        values.update(checked_overrides(overrides))
        host = (conn.host or "").strip()
        return cls(
            conn_id=conn.conn_id,
            base_url=normalize_base_url(conn.host, conn.port),
            token=conn.password or os.environ.get(TOKEN_ENV_VAR) or None,
            assumed_https=bool(host) and "://" not in host,
            **values,
        )

    def __repr__(self) -> str:
        return (
            f"ClientSettings(conn_id={self.conn_id!r}, base_url={self.redact(self.base_url)!r}, "
            f"token={'***' if self.token else None}, timeout={self.timeout}, "
            f"connect_timeout={self.connect_timeout}, max_retries={self.max_retries})"
        )

    def secrets(self) -> list[str]:
        """Return the values that must never be shown: the token and any credential in the base URL.

        The userinfo's password (or its user name when it stands alone as a token) and query values,
        both as written and percent-decoded, since messages may quote either form.
        """
        return list(self._secrets)

    @functools.cached_property
    def _secrets(self) -> tuple[str, ...]:  # worked out once: every event and log line is redacted
        found: list[str] = []
        parts = urlsplit(self.base_url)
        if parts.password:
            found.append(parts.password)
        elif parts.username:
            found.append(parts.username)  # https://<token>@proxy/...
        found.extend(pair.partition("=")[2] for pair in parts.query.split("&"))
        found.extend(value for _, value in parse_qsl(parts.query))
        found.extend([unquote(value) for value in found])
        # Short URL parts ("user", "1") are not worth hiding everywhere; the token always is.
        # Longest first, so a secret that contains another is replaced whole.
        secrets = {value for value in found if len(value) >= 6} | ({self.token} if self.token else set())
        return tuple(sorted(secrets, key=len, reverse=True))

    def redact(self, text: str) -> str:
        """``text`` with every value of :meth:`secrets` replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def url(self, path: str) -> str:
        """Return the absolute URL of an API path under the base URL.

        The base URL may have a path prefix; a query in ``path`` is added to the base URL's own.
        """
        parts = urlsplit(self.base_url)
        path, _, query = path.partition("?")
        query = "&".join(part for part in (parts.query, query) if part)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path, query=query))

    def headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        """Return the request headers: user agent, JSON, the token as bearer if any, then ``extra``."""
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra)
        return headers


def normalize_base_url(host: str | None, port: int | None = None) -> str:
    """Return the base URL for a connection's host: a default, a scheme if missing, no ``/v1``.

    ``port`` is added where the host names none and it is not the scheme's default (a stored 443
    must not make the API's own file URLs look like another origin).
    """
    if not host:
        return DEFAULT_BASE_URL
    url = host.strip()
    if "://" not in url:
        url = f"https://{url}"
    parts = urlsplit(url)
    if port and not parts.port and port != {"https": 443, "http": 80}.get(parts.scheme):
        parts = parts._replace(netloc=f"{parts.netloc}:{port}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit(parts._replace(path=path))


# --- hints that name the form's fields ----------------------------------------------------------


def auth_hint(settings: ClientSettings) -> str:
    """Say what to check after a 401/403: the form's token field (by its label) or the variable."""
    missing = "" if settings.token else "; no token is configured"
    return (
        f"Check the API token in connection {settings.conn_id!r} (its {TOKEN_LABEL!r} field, or the "
        f"{TOKEN_ENV_VAR} environment variable){missing}"
    )


def tls_hint(settings: ClientSettings, exc: BaseException) -> str | None:
    """Ask "did you mean http://...?" after a TLS failure against a host given without a scheme.

    A scheme-less host is taken as https (the token is never sent in the clear by guesswork); a
    server that speaks plain HTTP then fails the TLS handshake with an error that does not say so.
    ``None`` where the host had a scheme or ``exc`` is no TLS failure.
    """
    if not settings.assumed_https or not _is_tls_failure(exc):
        return None
    plain = "http://" + settings.base_url.removeprefix("https://")
    return (
        f"the connection's {HOST_LABEL} has no scheme, so https:// was assumed, and the TLS handshake "
        f"failed; if the server speaks plain HTTP, did you mean {settings.redact(plain)!r}?"
    )


def _is_tls_failure(exc: BaseException) -> bool:
    """Tell whether ``exc`` or anything it wraps is an SSL error."""
    chain = exception_chain(exc)
    return any(isinstance(item, ssl.SSLError) or "SSL" in type(item).__name__ for item in chain)


#: How long hooks in one event loop (the triggerer's) reuse a connection's settings. Every trigger
#: builds its own hook, and each lookup goes through the secrets backends (in a triggerer, a round
#: trip over the supervisor to the API server). A rotated token is picked up at once all the same:
#: an auth error looks the connection up again and retries with the new settings (see
#: :class:`~airflow_provider_kontext.hooks.retry.Attempts`).
SETTINGS_TTL_SECONDS = 60.0

SettingsKey = tuple[Any, ...]  # the connection id, then the overrides as sorted (name, value) pairs


class SettingsCache:
    """Connection settings per event loop, for :data:`SETTINGS_TTL_SECONDS`."""

    _entries: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[SettingsKey, tuple[ClientSettings, float]]
    ] = weakref.WeakKeyDictionary()

    @classmethod
    def get(cls, key: SettingsKey) -> ClientSettings | None:
        """Return this loop's cached settings for ``key``, ``None`` when absent or expired."""
        entry = cls._entries.get(asyncio.get_running_loop(), {}).get(key)
        if entry is None or time.monotonic() >= entry[1]:
            return None
        return entry[0]

    @classmethod
    def put(cls, key: SettingsKey, settings: ClientSettings) -> None:
        """Cache ``settings`` for ``key`` in this loop."""
        loop = asyncio.get_running_loop()
        entries = cls._entries.setdefault(loop, {})
        entries[key] = (settings, time.monotonic() + SETTINGS_TTL_SECONDS)

    @classmethod
    def drop(cls, key: SettingsKey) -> None:
        """Forget this loop's settings for ``key``."""
        cls._entries.get(asyncio.get_running_loop(), {}).pop(key, None)
