"""The public surface: the package's exports, and the names of releases before 0.2 still importable."""

from __future__ import annotations

import subprocess
import sys

import pytest

import airflow_provider_kontext
from airflow_provider_kontext import exceptions

OLD_EXCEPTION_NAMES = [
    "KontextError",
    "KontextInputError",
    "KontextAPIError",
    "KontextAuthError",
    "KontextNotFoundError",
    "KontextRateLimitError",
    "KontextServerError",
    "KontextTransportError",
    "KontextTLSError",
    "KontextPredictionMayExistError",
    "KontextDeadlineError",
    "KontextPredictionFailed",
    "KontextPredictionFailedNoRetry",
    "KontextBatchFailed",
    "KontextBatchFailedNoRetry",
]


@pytest.mark.parametrize("old", OLD_EXCEPTION_NAMES)
def test_an_old_exception_name_is_the_same_class(old: str) -> None:
    assert getattr(exceptions, old) is getattr(exceptions, "Flux" + old)


def test_old_names_elsewhere_are_the_same_classes() -> None:
    from airflow_provider_kontext.links.kontext import FluxKontextPredictionLink, ReplicatePredictionLink
    from airflow_provider_kontext.operators.kontext import KontextPredictionFailedNoRetry
    from airflow_provider_kontext.testing import FluxKontextEmulator, KontextEmulator

    assert ReplicatePredictionLink is FluxKontextPredictionLink
    assert KontextEmulator is FluxKontextEmulator
    assert KontextPredictionFailedNoRetry is exceptions.FluxKontextPredictionFailedNoRetry


def test_the_package_exports_the_public_classes() -> None:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator
    from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
    from airflow_provider_kontext.sensors.kontext import FluxKontextPredictionSensor
    from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

    for cls in (
        FluxKontextHook,
        FluxKontextEditOperator,
        FluxKontextBatchEditOperator,
        FluxKontextPredictionSensor,
        FluxKontextPredictionTrigger,
    ):
        assert getattr(airflow_provider_kontext, cls.__name__) is cls
        assert cls.__name__ in airflow_provider_kontext.__all__


def test_the_package_and_its_exceptions_import_no_airflow() -> None:
    code = (
        "import sys, airflow_provider_kontext, airflow_provider_kontext.exceptions;"
        "sys.exit('airflow' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
