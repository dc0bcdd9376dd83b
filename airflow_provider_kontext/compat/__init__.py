"""What differs between the Airflow versions the provider supports (3.1, 3.2, 3.3), in one place.

Everything else imports these names from here instead of guessing where Airflow keeps them:

- ``AirflowFailException``, ``AirflowSensorTimeout``, ``AirflowSkipException`` and ``TaskDeferred``
  live in ``airflow.sdk.exceptions`` from 3.2 on and only in ``airflow.exceptions`` on 3.1.
- :func:`mask_secret` (sync code) and :func:`amask_secret` (event-loop code): Airflow has
  ``airflow.sdk.log.amask_secret`` only from 3.3. Before that the sync ``mask_secret`` reports each
  secret to the supervisor with a blocking round trip, which must not run on the triggerer's event
  loop (on 3.1 it fails inside the loop, on 3.2 it re-enters the loop through greenback), so the
  async variant here registers the secret locally and reports it with ``await comms.asend(...)``
  the way 3.3 does.
- ``context["task_state_store"]`` (a store that survives retries) exists from 3.3:
  :data:`HAS_TASK_STATE_STORE`.
- On 3.1 the connection form's extra fields come from the hook's ``get_connection_form_widgets()``
  (wtforms fields, which the UI converts); 3.2 and later read the declarative ``conn-fields`` of
  ``get_provider_info``. :func:`connection_form_widgets` builds the former from the latter.

Importing this module costs only what the operator already imports (``airflow.sdk``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from airflow import __version__ as AIRFLOW_VERSION

try:  # Airflow >= 3.2
    from airflow.sdk.exceptions import (
        AirflowFailException,
        AirflowSensorTimeout,
        AirflowSkipException,
        TaskDeferred,
    )
except ImportError:  # Airflow 3.1
    from airflow.exceptions import (  # type: ignore[no-redef]
        AirflowFailException,
        AirflowSensorTimeout,
        AirflowSkipException,
        TaskDeferred,
    )

__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3_2_PLUS",
    "AIRFLOW_V_3_3_PLUS",
    "HAS_TASK_STATE_STORE",
    "AirflowFailException",
    "AirflowSensorTimeout",
    "AirflowSkipException",
    "TaskDeferred",
    "amask_secret",
    "connection_form_widgets",
    "hook_field_behaviour",
    "mask_secret",
]


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``3.2.2`` or ``3.3.0rc1``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


AIRFLOW_V_3_2_PLUS = _release(AIRFLOW_VERSION) >= (3, 2)
AIRFLOW_V_3_3_PLUS = _release(AIRFLOW_VERSION) >= (3, 3)

#: Whether task contexts carry ``task_state_store`` (Airflow >= 3.3), which reattach-on-retry needs.
HAS_TASK_STATE_STORE = AIRFLOW_V_3_3_PLUS


def mask_secret(secret: str, name: str | None = None) -> None:
    """Register a secret with Airflow's log masker from sync code (a task, a CLI, a test).

    The same on every supported version; never call it on an event loop (use :func:`amask_secret`).
    """
    from airflow.sdk.log import mask_secret as sdk_mask_secret

    sdk_mask_secret(secret, name)


async def amask_secret(secret: str, name: str | None = None) -> None:
    """Register a secret with Airflow's log masker from code running on an event loop (a trigger).

    On 3.3+ this is Airflow's own ``amask_secret``; before, :func:`_amask_secret_before_3_3`.
    """
    try:
        from airflow.sdk.log import amask_secret as sdk_amask_secret
    except ImportError:  # Airflow < 3.3
        await _amask_secret_before_3_3(secret, name)
    else:
        await sdk_amask_secret(secret, name)


async def _amask_secret_before_3_3(secret: str, name: str | None = None) -> None:
    """Mask a secret without blocking the event loop, as Airflow 3.3's ``amask_secret`` does.

    For 3.1 and 3.2: add the secret to this process's masker, then report it to the supervisor (if
    any) with ``await comms.asend(...)``, never the blocking ``send``. A failure to report is
    ignored as Airflow's own function ignores it: the local masking has already happened.
    """
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    _secrets_masker().add_mask(secret, name)
    with suppress(Exception):
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.comms import MaskSecret

        comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
        if comms is not None:
            await comms.asend(MaskSecret(value=secret, name=name))


def hook_field_behaviour(declarative: Mapping[str, Any]) -> dict[str, Any]:
    """Return the declarative ``ui-field-behaviour`` in the shape of ``get_ui_field_behaviour()``.

    Airflow 3.1 reads the hook method, whose keys use underscores (``hidden_fields``) where the
    declarative form uses dashes; 3.1 rejects the whole behaviour if a key is spelled the other way.
    """
    return {key.replace("-", "_"): value for key, value in declarative.items()}


def connection_form_widgets(fields: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Return the connection form's extra fields as wtforms fields, for Airflow 3.1's form.

    Built from the declarative ``conn-fields`` (one place for each fact): ``integer`` fields become
    ``IntegerField``, other numbers ``StringField`` (Airflow's form has no float field; the hook
    parses numbers from strings and names the extra when one is not a number).

    :raises ImportError: wtforms or flask_appbuilder are missing (Airflow catches this and shows the
        form without the extra fields).
    """
    from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import IntegerField, StringField
    from wtforms.validators import Optional

    widgets: dict[str, Any] = {}
    for name, field in fields.items():
        schema = field.get("schema", {})
        types = schema.get("type", "string")
        kind = IntegerField if "integer" in ([types] if isinstance(types, str) else types) else StringField
        widgets[name] = kind(
            lazy_gettext(field.get("label", name)),
            validators=[Optional()],
            description=field.get("description", ""),
            default=schema.get("default"),
            widget=BS3TextFieldWidget(),
        )
    return widgets
