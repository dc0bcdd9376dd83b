"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``).

Metadata only: the connection type, form and hook name come from
:mod:`airflow_provider_kontext.hooks.connection`, the light module the hook takes them from too.
Kept free of heavy imports: Airflow loads it in every process that lists providers.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata in the shape ``ProvidersManager`` expects."""
    from airflow_provider_kontext import __version__
    from airflow_provider_kontext.hooks import connection

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
                "python-modules": [
                    "airflow_provider_kontext.operators.kontext",
                    "airflow_provider_kontext.operators.batch",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": "FLUX.1 Kontext",
                "python-modules": ["airflow_provider_kontext.sensors.kontext"],
            }
        ],
        "triggers": [
            {
                "integration-name": "FLUX.1 Kontext",
                "python-modules": [
                    "airflow_provider_kontext.triggers.kontext",
                    "airflow_provider_kontext.triggers.batch",
                ],
            }
        ],
        "connection-types": [
            {
                "connection-type": connection.CONN_TYPE,
                "hook-class-name": connection.HOOK_CLASS,
                "hook-name": connection.HOOK_NAME,
                "conn-fields": connection.conn_fields(),
                "ui-field-behaviour": connection.ui_field_behaviour(),
            }
        ],
        "extra-links": ["airflow_provider_kontext.links.kontext.FluxKontextPredictionLink"],
        # The edits' images in the UI (Airflow >= 3.1; Pillow from the ``ui`` extra makes thumbnails).
        "plugins": [
            {
                "name": "kontext_edits",
                "plugin-class": "airflow_provider_kontext.plugins.kontext.FluxKontextEditsPlugin",
            }
        ],
    }
