"""Apache Airflow provider for FLUX.1 Kontext image edits through Replicate's predictions API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["FluxKontextBatchEditOperator", "FluxKontextEditOperator", "__version__"]

if TYPE_CHECKING:
    from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator
    from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator


def __getattr__(name: str) -> Any:
    """The operators, imported on first use (``get_provider_info`` imports this package and must
    stay free of Airflow imports)."""
    if name == "FluxKontextEditOperator":
        from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

        return FluxKontextEditOperator
    if name == "FluxKontextBatchEditOperator":
        from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator

        return FluxKontextBatchEditOperator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
