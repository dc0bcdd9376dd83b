"""Share what the emulator test modules need: fast timings, small PNGs, the ``emu`` fixture's options.

What the emulator test modules share: fast emulator timings, small PNGs, and the ``emu`` fixture's
options, set per test with :func:`options`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from PIL import Image

from airflow_provider_kontext.testing import FluxKontextEmulator

#: Emulator timings that keep a test's predictions well under a second.
FAST = {"prediction_seconds": 0.1, "start_seconds": 0.02, "output_scale": 0.05}


def png(size: tuple[int, int] = (96, 64), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def options(**values: Any) -> pytest.MarkDecorator:
    """Run the test against an ``emu`` with these constructor options on top of the module's."""
    return pytest.mark.parametrize("emu", [values], indirect=True, ids=["options"])


@contextmanager
def started(request: pytest.FixtureRequest, **defaults: Any) -> Iterator[FluxKontextEmulator]:
    """Return an emulator with ``FAST``, then ``defaults``, then what :func:`options` asked for."""
    with FluxKontextEmulator(**{**FAST, **defaults, **getattr(request, "param", {})}) as emulator:
        yield emulator
