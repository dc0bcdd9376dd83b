"""Apache Airflow provider for FLUX.1 Kontext image edits through Replicate's predictions API."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
