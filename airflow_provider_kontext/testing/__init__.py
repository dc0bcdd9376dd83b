"""Test support: an offline emulator of Replicate's predictions API for FLUX.1 Kontext.

Importing this package is cheap; the emulator (FastAPI, uvicorn, Pillow: the ``emulator`` extra)
loads on first use of :class:`FluxKontextEmulator`. For pytest, enable the fixture ``kontext_emulator``
with ``pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin"]``.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

#: What the emulator imports from the ``emulator`` extra (Pillow is imported as PIL).
_EMULATOR_MODULES = ("fastapi", "uvicorn", "PIL")
_missing = [name for name in _EMULATOR_MODULES if find_spec(name) is None]
if _missing:
    raise ImportError(
        "airflow_provider_kontext.testing (the emulator) needs the 'emulator' extra: "
        "pip install 'airflow-provider-kontext[emulator]' (missing: " + ", ".join(_missing) + ")"
    )

if TYPE_CHECKING:
    from airflow_provider_kontext.testing.faults import Faults
    from airflow_provider_kontext.testing.ratelimit import RateLimit
    from airflow_provider_kontext.testing.server import FluxKontextEmulator
    from airflow_provider_kontext.testing.service import RequestRecord
    from airflow_provider_kontext.testing.webhooks import Delivery

__all__ = ["Delivery", "Faults", "FluxKontextEmulator", "RateLimit", "RequestRecord"]

_LAZY = {
    "FluxKontextEmulator": "airflow_provider_kontext.testing.server",
    "KontextEmulator": "airflow_provider_kontext.testing.server",  # the name before 0.2
    "Faults": "airflow_provider_kontext.testing.faults",
    "RateLimit": "airflow_provider_kontext.testing.ratelimit",
    "RequestRecord": "airflow_provider_kontext.testing.service",
    "Delivery": "airflow_provider_kontext.testing.webhooks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
