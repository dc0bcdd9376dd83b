"""The HTTP routes: Replicate's endpoints and the control endpoints, mapped onto the service's stores.

Each route only reads the request and calls one store: predictions (``predictions.py``), files
(``files.py``), models (``model_catalog.py``), the webhook secret (``webhooks.py``), the account,
and below ``/_emulator`` the faults, state and reset (``service.py``). Errors become RFC 7807
answers (``problems.py``). The paths here are below the path prefix; ``gateway.py`` strips it.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_provider_kontext.testing.problems import ProblemError, problem_response
from airflow_provider_kontext.testing.service import ACCOUNT, EmulatorService

#: The path below which the control endpoints live (not logged, no faults, no token).
CONTROL = "/_emulator"


def _base_url(request: Request) -> str:
    """Return the base URL the client used, path prefix included, without a trailing slash."""
    return str(request.base_url).rstrip("/")


def build_api(service: EmulatorService) -> FastAPI:
    """Return the FastAPI app with Replicate's endpoints and the control endpoints."""
    api = FastAPI(title="Kontext emulator", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(api)
    _add_prediction_routes(api, service)
    _add_model_routes(api, service)
    _add_file_routes(api, service)
    _add_control_routes(api, service)
    return api


def _add_error_handlers(api: FastAPI) -> None:
    """Answer every error, the framework's own included, as an RFC 7807 problem."""

    @api.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> Response:
        return problem_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        title = HTTPStatus(exc.status_code).phrase
        return problem_response(ProblemError(exc.status_code, title, str(exc.detail)))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        fields = [".".join(str(p) for p in error["loc"] if p != "body") for error in exc.errors()]
        detail = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, exc.errors(), strict=True))
        return problem_response(ProblemError(422, "Unprocessable Entity", detail))


def _add_prediction_routes(api: FastAPI, service: EmulatorService) -> None:
    """Route creates, get, list, cancel, stream, output files and web pages to the predictions."""
    predictions = service.predictions

    async def create(request: Request, model: str | None) -> Response:
        status, body = await predictions.create(
            base_url=_base_url(request),
            model=model,
            body=await request.body(),
            prefer=request.headers.get("prefer"),
            cancel_after=request.headers.get("cancel-after"),
        )
        return JSONResponse(body, status_code=status)

    @api.post("/v1/models/{owner}/{name}/predictions")
    async def create_for_model(owner: str, name: str, request: Request) -> Response:
        return await create(request, f"{owner}/{name}")

    @api.post("/v1/predictions")
    async def create_for_version(request: Request) -> Response:
        return await create(request, None)

    @api.get("/v1/predictions")
    async def list_predictions(
        request: Request,
        cursor: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> dict[str, Any]:
        return await predictions.listing(
            _base_url(request), cursor=cursor, created_after=created_after, created_before=created_before
        )

    @api.get("/v1/predictions/{prediction_id}")
    async def get_prediction(prediction_id: str) -> dict[str, Any]:
        return await predictions.get(prediction_id)

    @api.get("/v1/predictions/{prediction_id}/stream")
    async def stream_prediction(prediction_id: str) -> Response:
        events = predictions.stream(prediction_id)
        first = await anext(events, None)  # an unknown id answers 404 before the stream starts

        async def body() -> Any:
            if first is not None:
                yield first
            async for event in events:
                yield event

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    @api.post("/v1/predictions/{prediction_id}/cancel")
    async def cancel_prediction(prediction_id: str) -> dict[str, Any]:
        return await predictions.cancel(prediction_id)

    @api.get("/files/{prediction_id}/{filename}")
    async def output_file(prediction_id: str, filename: str) -> Response:
        data, content_type = predictions.output_file(prediction_id, filename)
        return Response(data, media_type=content_type)

    @api.get("/p/{prediction_id}", response_class=HTMLResponse)
    async def web_page(prediction_id: str) -> str:
        return predictions.web_page(prediction_id)


def _add_model_routes(api: FastAPI, service: EmulatorService) -> None:
    """Route the models, their versions, the webhook secret and the account."""
    models = service.models

    @api.get("/v1/models/{owner}/{name}")
    async def get_model(owner: str, name: str, request: Request) -> dict[str, Any]:
        return models.model(_base_url(request), owner, name)

    @api.get("/v1/models/{owner}/{name}/versions")
    async def list_versions(owner: str, name: str) -> dict[str, Any]:
        return models.versions(owner, name)

    @api.get("/v1/models/{owner}/{name}/versions/{version_id}")
    async def get_version(owner: str, name: str, version_id: str) -> dict[str, Any]:
        return models.version(owner, name, version_id)

    @api.get("/v1/webhooks/default/secret")
    async def webhook_secret() -> dict[str, Any]:
        return {"key": service.webhooks.secret}

    @api.get("/v1/account")
    async def account() -> dict[str, Any]:
        return dict(ACCOUNT)


def _add_file_routes(api: FastAPI, service: EmulatorService) -> None:
    """Route uploads, the file list, get, delete and signed downloads to the files."""
    files = service.files

    @api.post("/v1/files", status_code=201)
    async def upload(
        request: Request,
        content: Annotated[UploadFile, File()],
        filename: Annotated[str | None, Form()] = None,
        content_type: Annotated[str | None, Form(alias="type")] = None,
        metadata: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        return files.upload(
            base_url=_base_url(request),
            data=await content.read(),
            filename=filename or content.filename,
            content_type=content_type or content.content_type,
            metadata=metadata,
        )

    @api.get("/v1/files")
    async def list_files(request: Request) -> dict[str, Any]:
        return files.listing(_base_url(request))

    @api.get("/v1/files/{file_id}")
    async def uploaded_file(file_id: str, request: Request) -> dict[str, Any]:
        return files.get(file_id).to_json(_base_url(request))

    @api.delete("/v1/files/{file_id}", status_code=204)
    async def delete_file(file_id: str) -> Response:
        files.delete(file_id)
        return Response(status_code=204)

    @api.get("/v1/files/{file_id}/download")
    async def download_file(file_id: str, owner: str = "", expiry: str = "", signature: str = "") -> Response:
        stored = files.download(file_id, owner, expiry, signature)
        return Response(stored.data, media_type=stored.content_type)


def _add_control_routes(api: FastAPI, service: EmulatorService) -> None:
    """Route ``/_emulator/state``, ``/_emulator/faults`` and ``/_emulator/reset``."""

    @api.get(f"{CONTROL}/state")
    async def state() -> dict[str, Any]:
        return service.state()

    @api.post(f"{CONTROL}/faults")
    async def arm_faults(request: Request) -> dict[str, Any]:
        try:
            specs = await request.json()
        except ValueError as exc:
            raise ProblemError(400, "Bad Request", f"The request body is not valid JSON: {exc}") from None
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, dict):
                raise ProblemError(
                    400, "Bad Request", 'each fault must be an object like {"fault": "throttle"}'
                )
            try:
                service.faults.apply(spec)
            except ValueError as exc:
                raise ProblemError(400, "Bad Request", str(exc)) from None
        return service.faults.describe()

    @api.post(f"{CONTROL}/reset")
    async def reset() -> dict[str, Any]:
        service.reset()
        return service.state()
