"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``).

Kept free of heavy imports: Airflow loads it in every process that lists providers.
"""

from __future__ import annotations

from typing import Any

CONN_TYPE = "flux_kontext"
DEFAULT_CONN_ID = "flux_kontext_default"
HOOK_CLASS = "airflow_provider_kontext.hooks.kontext.FluxKontextHook"

#: What the connection form shows: the base URL in ``host``, the token in ``password``.
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "port", "login"],
    "relabeling": {"host": "Base URL", "password": "API Token"},
    "placeholders": {
        "host": "https://api.replicate.com (or a Replicate-compatible proxy, e.g. https://proxy.example/replicate)",
        "password": "r8_... (optional: falls back to REPLICATE_API_TOKEN; some proxies need none)",
        "extra": '{"timeout": 30, "connect_timeout": 10, "max_retries": 5, "backoff_max": 30}',
    },
}

#: Extra fields of the connection form, as JSON schema (Airflow >= 3.2 reads these declaratively).
CONN_FIELDS: dict[str, Any] = {
    "timeout": {
        "label": "Read timeout (seconds)",
        "schema": {"type": ["number", "null"], "minimum": 1, "default": 30},
    },
    "connect_timeout": {
        "label": "Connect timeout (seconds)",
        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 10},
    },
    "max_retries": {
        "label": "Retries of transient errors (429, 5xx, network)",
        "schema": {"type": ["integer", "null"], "minimum": 0, "default": 5},
    },
    "backoff_max": {
        "label": "Longest wait between retries (seconds)",
        "schema": {"type": ["number", "null"], "minimum": 0, "default": 30},
    },
    "retry_after_max": {
        "label": "Longest wait a server's Retry-After may ask for (seconds)",
        "schema": {"type": ["number", "null"], "minimum": 0, "default": 60},
    },
}


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata in the shape ``ProvidersManager`` expects."""
    from airflow_provider_kontext import __version__

    return {
        "package-name": "airflow-provider-kontext",
        "name": "FLUX.1 Kontext (Replicate)",
        "description": "Edit images with FLUX.1 Kontext through Replicate's predictions API "
        "or a Replicate-compatible proxy.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "FLUX.1 Kontext",
                "external-doc-url": "https://replicate.com/black-forest-labs/flux-kontext-dev",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "FLUX.1 Kontext",
                "python-modules": ["airflow_provider_kontext.hooks.kontext"],
            }
        ],
        "operators": [
            {
                "integration-name": "FLUX.1 Kontext",
                "python-modules": ["airflow_provider_kontext.operators.kontext"],
            }
        ],
        "triggers": [
            {
                "integration-name": "FLUX.1 Kontext",
                "python-modules": ["airflow_provider_kontext.triggers.kontext"],
            }
        ],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": HOOK_CLASS,
                "hook-name": "Flux Kontext",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
        "extra-links": ["airflow_provider_kontext.links.kontext.ReplicatePredictionLink"],
    }
