"""The emulator's options, as :class:`~airflow_provider_kontext.testing.FluxKontextEmulator` takes them.

A frozen value every store reads; nothing in it changes while the emulator runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow_provider_kontext.testing.lifecycle import Timing
from airflow_provider_kontext.testing.ratelimit import RateLimit


@dataclass(frozen=True)
class EmulatorConfig:
    """The emulator's options (see :class:`~airflow_provider_kontext.testing.FluxKontextEmulator`)."""

    token: str | None = None
    path_prefix: str = ""
    timing: Timing = field(default_factory=Timing)
    output_scale: float = 1.0
    upload_ttl_seconds: float = 24 * 3600.0
    rate_limit: RateLimit | None = None
    timing_seed: int = 0
    webhook_secret: str | None = None
