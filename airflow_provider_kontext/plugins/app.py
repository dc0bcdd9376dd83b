"""The plugin's FastAPI app, mounted on Airflow's API server under ``/kontext`` (see :mod:`.kontext`).

Airflow does not protect a plugin's app: every route here asks Airflow's auth manager itself, with
the API server's own dependencies (``requires_access_dag`` for a route about one DAG, the user's
readable DAG ids for the recent edits), so a user sees edits only of DAGs they may read, through
the session cookie of the UI or a bearer token. Images are found by (DAG, run, task, map index,
edit, side, number) and their locations come from the task's records only
(:mod:`~airflow_provider_kontext.plugins.records`); no request parameter is ever a path. Nothing
secret is read: no connection, no token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from airflow_provider_kontext.edits.thumbnails import thumbnail_location
from airflow_provider_kontext.plugins import pages
from airflow_provider_kontext.plugins.media import (
    Picture,
    ThumbnailCache,
    Unavailable,
    placeholder,
    read_bytes,
)
from airflow_provider_kontext.plugins.records import Edit, TaskKey, recent_edits, run_edits, task_edits

#: Edits per gallery page, and per page of the recent edits.
PAGE_SIZE = 48
#: Headers of every answer: no caching by shared caches, no sniffing, no framing by other sites.
SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": pages.CSP + "; frame-ancestors 'self'",
}

THUMBNAILS = ThumbnailCache()


def _session() -> Iterator[Any]:
    from airflow.utils.session import create_session

    with create_session(scoped=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]
#: Airflow's own check that the user may read the task instances of the ``dag_id`` asked for.
READ_DAG = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.TASK_INSTANCE))]


def _readable(user: GetUserDep) -> set[str]:
    """Return the ids of the DAGs the user may read, as Airflow's auth manager says."""
    from airflow.api_fastapi.app import get_auth_manager

    return set(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))


ReadableDags = Annotated[set[str], Depends(_readable)]


def _map_index(map_index: Annotated[str, Query(max_length=12)] = "-1") -> int:
    """Return the map index asked for; -1 (not mapped) for anything but a whole number.

    Such as the ``{MAP_INDEX}`` the UI leaves in a view's link for a task that is not mapped.
    """
    text = map_index.strip()
    return int(text) if text.lstrip("-").isdigit() and int(text) >= -1 else -1


def _root(request: Request) -> str:
    """Where the app is mounted, as the browser sees it (links are built from it)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _html(text: str) -> HTMLResponse:
    return HTMLResponse(text, headers={**SAFE_HEADERS, "Cache-Control": "no-store"})


def _image(picture: Picture, *, reason: str | None = None) -> Response:
    headers = {**SAFE_HEADERS, "Cache-Control": "private, max-age=600" if reason is None else "no-store"}
    if reason is not None:
        headers["X-Kontext-Unavailable"] = reason
    return Response(picture.data, media_type=picture.content_type, headers=headers)


def _paged(items: list[Edit], page: int) -> tuple[list[Edit], int, int]:
    pages = max(1, math.ceil(len(items) / PAGE_SIZE))
    current = min(max(1, page), pages)
    return items[(current - 1) * PAGE_SIZE : current * PAGE_SIZE], current, pages


def create_app() -> FastAPI:
    """Build the app: an edit's view, a run's gallery, the recent edits, and the images they show."""
    app = FastAPI(title="FLUX.1 Kontext edits", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/edit", response_class=HTMLResponse, dependencies=READ_DAG)
    def edit_view(
        request: Request,
        session: SessionDep,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: Annotated[int, Depends(_map_index)],
    ) -> HTMLResponse:
        """Show a task instance's edits, large, with their facts (the task instance's external view)."""
        edits = task_edits(session, TaskKey(dag_id, run_id, task_id, map_index))
        suffix = f" [{map_index}]" if map_index >= 0 else ""
        return _html(pages.edit_page(_root(request), edits, f"{task_id}{suffix} of {dag_id} / {run_id}"))

    @app.get("/gallery", response_class=HTMLResponse, dependencies=READ_DAG)
    def gallery(
        request: Request,
        session: SessionDep,
        dag_id: str,
        run_id: str,
        task: Annotated[str | None, Query(max_length=250)] = None,
        status: Annotated[str | None, Query(max_length=40)] = None,
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    ) -> HTMLResponse:
        """Every edit of a run (mapped and batch), filtered by task and status, a page at a time."""
        edits = run_edits(session, dag_id, run_id)
        matching = [
            e for e in edits if (not task or e.key.task_id == task) and (not status or e.status == status)
        ]
        shown, current, count = _paged(matching, page)
        return _html(
            pages.gallery_page(
                _root(request),
                dag_id,
                run_id,
                shown,
                total=len(edits),
                matching=len(matching),
                tasks=sorted({e.key.task_id for e in edits}),
                statuses=sorted({e.status for e in edits}),
                task=task or None,
                status=status or None,
                current=current,
                pages=count,
            )
        )

    @app.get("/recent", response_class=HTMLResponse)
    def recent(
        request: Request,
        session: SessionDep,
        dag_ids: ReadableDags,
        page: Annotated[int, Query(ge=1, le=1000)] = 1,
    ) -> HTMLResponse:
        """Show the newest edits of the DAGs the user may read (the navigation's view)."""
        shown, current, count = _paged(recent_edits(session, dag_ids), page)
        return _html(pages.recent_page(_root(request), shown, current, count))

    @app.get("/image", dependencies=READ_DAG)
    def image(
        session: SessionDep,
        dag_id: str,
        run_id: str,
        task_id: str,
        side: Literal["input", "output"],
        map_index: Annotated[int, Depends(_map_index)],
        edit: Annotated[int, Query(ge=0, le=10_000)] = 0,
        n: Annotated[int, Query(ge=0, le=10_000)] = 0,
        size: Literal["thumb", "full"] = "thumb",
    ) -> Response:
        """Serve an image an edit recorded: its thumbnail, or the file itself.

        A picture of the reason when it cannot be shown. 404 for an edit or image the task did not
        record.
        """
        found = [
            e for e in task_edits(session, TaskKey(dag_id, run_id, task_id, map_index)) if e.number == edit
        ]
        if not found:
            raise HTTPException(404, "No such edit")
        record = found[0]
        locations = [record.summary.get("input_image")] if side == "input" else list(record.outputs())
        location = locations[n] if n < len(locations) else None
        if not isinstance(location, str) or not location:
            raise HTTPException(404, "No such image")
        expired = side == "output" and record.urls_expired()
        try:
            if size == "thumb":
                saved = record.outputs()[:1] if side == "input" else [location]
                sidecar = thumbnail_location(saved[0], of_input=side == "input") if saved else None
                return _image(THUMBNAILS.get(location, expired=expired, saved=sidecar))
            return _image(read_bytes(location, expired=expired))
        except Unavailable as exc:
            return _image(placeholder(str(exc)), reason=str(exc))

    return app
