"""Pydantic models: the single source of the models' input schemas and of what the API answers.

The input schemas are in :mod:`.inputs`, the API's answers in :mod:`.predictions`. Import them from
here.
"""

from __future__ import annotations

from airflow_provider_kontext.models.inputs import (
    DEFAULT_MODEL,
    IMAGE_CONTENT_TYPES,
    IMAGE_URI_SCHEMES,
    INPUT_MODELS,
    MODEL_REFERENCE,
    AspectRatio,
    FluxKontextDevInput,
    FluxKontextProInput,
    PassThroughInput,
    ProAspectRatio,
    check_literal_input,
    check_model_reference,
    input_model_for,
    model_name,
    validate_input,
)
from airflow_provider_kontext.models.predictions import (
    TERMINAL_STATUSES,
    Account,
    FileUrls,
    Prediction,
    PredictionMetrics,
    PredictionPage,
    PredictionStatus,
    PredictionUrls,
    UploadedFile,
)

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_CONTENT_TYPES",
    "IMAGE_URI_SCHEMES",
    "INPUT_MODELS",
    "MODEL_REFERENCE",
    "TERMINAL_STATUSES",
    "Account",
    "AspectRatio",
    "FileUrls",
    "FluxKontextDevInput",
    "FluxKontextProInput",
    "PassThroughInput",
    "Prediction",
    "PredictionMetrics",
    "PredictionPage",
    "PredictionStatus",
    "PredictionUrls",
    "ProAspectRatio",
    "UploadedFile",
    "check_literal_input",
    "check_model_reference",
    "input_model_for",
    "model_name",
    "validate_input",
]
