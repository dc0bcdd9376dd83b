"""pytest plugin with the ``kontext_emulator`` fixture: a started :class:`FluxKontextEmulator` per test.

Enable it with ``pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin"]``. Options go
to the emulator's constructor, from the ``kontext_emulator_options`` fixture (override it in a
conftest) and then from a marker on the test::

    @pytest.mark.kontext_emulator(prediction_seconds=0.2, output_scale=0.1, token="t")
    def test_edit(kontext_emulator): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from airflow_provider_kontext.testing.emulator import FluxKontextEmulator


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``kontext_emulator`` marker."""
    config.addinivalue_line(
        "markers", "kontext_emulator(**options): constructor options for the kontext_emulator fixture"
    )


@pytest.fixture
def kontext_emulator_options() -> dict[str, Any]:
    """Return the constructor options of ``kontext_emulator``; override it to change the defaults."""
    return {}


@pytest.fixture
def kontext_emulator(
    request: pytest.FixtureRequest, kontext_emulator_options: dict[str, Any]
) -> Iterator[FluxKontextEmulator]:
    """Yield a started emulator on 127.0.0.1 and stop it after the test.

    Options come from ``kontext_emulator_options``, then from the test's ``kontext_emulator`` marker.
    """
    from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

    options = dict(kontext_emulator_options)
    marker = request.node.get_closest_marker("kontext_emulator")
    if marker is not None:
        options.update(marker.kwargs)
    with FluxKontextEmulator(**options) as emulator:
        yield emulator
