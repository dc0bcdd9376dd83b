"""The models the emulator serves: ``GET /v1/models/{owner}/{name}`` and their versions.

Each model of :data:`~airflow_provider_kontext.models.INPUT_MODELS` has one fake version whose
OpenAPI schema is built from the provider's own input model, so a client that reads the schema
sees the inputs the emulator validates. Unknown models answer 404; a create by an unknown version
hash runs flux-kontext-dev, as the emulator cannot know which model a hash was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from airflow_provider_kontext.models import DEFAULT_MODEL, INPUT_MODELS, input_model_for
from airflow_provider_kontext.testing.problems import ProblemError

#: Fake version ids of the models the emulator serves (64 hex characters, like Replicate's).
MODEL_VERSIONS: dict[str, str] = {
    model: hashlib.sha256(f"kontext-emulator:{model}".encode()).hexdigest() for model in INPUT_MODELS
}
_VERSION_MODELS = {version: model for model, version in MODEL_VERSIONS.items()}
_MODEL_CREATED = "2025-05-29T00:00:00Z"


def resolve_model(model: str | None, version: Any) -> tuple[str, str]:
    """Return the ``(model, version)`` a create runs.

    ``model`` is ``owner/name`` from the path of a create by model (its version shows as
    ``"hidden"``, as on Replicate); without it ``version`` is the body's ``owner/name:hash`` or bare
    hash. Unknown versions mean flux-kontext-dev.

    :raises ProblemError: 404 for a model the emulator does not serve, 422 for a missing version.
    """
    if model is not None:
        if model not in INPUT_MODELS:
            served = ", ".join(sorted(INPUT_MODELS))
            raise ProblemError(404, "Not found", f"Model {model} not found (the emulator serves {served})")
        return model, "hidden"
    if not isinstance(version, str) or not version.strip():
        raise ProblemError(
            422,
            "Input validation failed",
            "version: field required ('owner/name:hash' or a version hash)",
            extra={"invalid_fields": [{"field": "version", "description": "field required"}]},
        )
    name, _, version_id = version.strip().partition(":")
    if "/" in name:
        model_name = name if name in INPUT_MODELS else DEFAULT_MODEL
        return model_name, version_id or MODEL_VERSIONS[model_name]
    return _VERSION_MODELS.get(name, DEFAULT_MODEL), name


class ModelCatalog:
    """The models the emulator serves and their model and version endpoints.

    :param run_count: how many predictions have been created (the model's ``run_count``).
    """

    def __init__(self, run_count: Callable[[], int]) -> None:
        self._run_count = run_count

    def model(self, base_url: str, owner: str, name: str) -> dict[str, Any]:
        """Answer ``GET /v1/models/{owner}/{name}``.

        :raises ProblemError: 404 for a model the emulator does not serve.
        """
        model_name = _served_model(owner, name)
        return {
            "url": f"{base_url}/models/{model_name}",
            "owner": owner,
            "name": name,
            "description": f"{model_name} as served by the offline Kontext emulator",
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "cover_image_url": None,
            "run_count": self._run_count(),
            "is_official": True,
            "default_example": None,
            "latest_version": _version_json(model_name),
        }

    def versions(self, owner: str, name: str) -> dict[str, Any]:
        """Answer ``GET /v1/models/{owner}/{name}/versions``: the one version each model has.

        :raises ProblemError: 404 for a model the emulator does not serve.
        """
        model_name = _served_model(owner, name)
        return {"next": None, "previous": None, "results": [_version_json(model_name)]}

    def version(self, owner: str, name: str, version_id: str) -> dict[str, Any]:
        """Answer ``GET /v1/models/{owner}/{name}/versions/{id}``.

        :raises ProblemError: 404 for an unknown model or version.
        """
        model_name = _served_model(owner, name)
        if version_id != MODEL_VERSIONS[model_name]:
            raise ProblemError(404, "Not found", f"Version {version_id} of {model_name} not found")
        return _version_json(model_name)


def _served_model(owner: str, name: str) -> str:
    """Return ``owner/name`` if the emulator serves it. :raises ProblemError: 404."""
    model_name = f"{owner}/{name}"
    if model_name not in INPUT_MODELS:
        served = ", ".join(sorted(INPUT_MODELS))
        detail = f"Model {model_name} not found (the emulator serves {served})"
        raise ProblemError(404, "Not found", detail)
    return model_name


def _version_json(model_name: str) -> dict[str, Any]:
    """Return the model's one version, with a Cog OpenAPI schema of its inputs."""
    schema = input_model_for(model_name).model_json_schema()
    return {
        "id": MODEL_VERSIONS[model_name],
        "created_at": _MODEL_CREATED,
        "cog_version": "0.14.0",
        "openapi_schema": {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "paths": {},
            "components": {
                "schemas": {
                    "Input": {**schema, "title": "Input"},
                    "Output": {"type": "string", "format": "uri", "title": "Output"},
                }
            },
        },
    }
