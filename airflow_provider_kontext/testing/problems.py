"""Error answers of the emulator: RFC 7807 ``application/problem+json`` bodies, as Replicate sends.

Every resource module raises :class:`ProblemError`; the app (``app.py``) and the gateway
(``gateway.py``) turn it into a response with :func:`problem_response`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

#: The media type of an error answer.
PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """An error answer: becomes an RFC 7807 ``application/problem+json`` response.

    :param status: the HTTP status code.
    :param title: the short title (Replicate's, like ``"Not found"``).
    :param detail: what was wrong, for the client's error message.
    :param headers: extra response headers (``WWW-Authenticate``, ``Retry-After``).
    :param extra: extra body members (``invalid_fields``).
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """Return the JSON body of the answer."""
        return {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


def problem_response(error: ProblemError) -> JSONResponse:
    """Return the RFC 7807 response for ``error``."""
    return JSONResponse(
        error.body(), status_code=error.status, headers=error.headers, media_type=PROBLEM_JSON
    )


def invalid_field(field_name: str, description: str) -> ProblemError:
    """Return a 422 for a request body that does not match the OpenAPI description.

    The body names the field in ``invalid_fields``, as Replicate's does.
    """
    return ProblemError(
        422,
        "Unprocessable Entity",
        f"{field_name}: {description}",
        extra={"invalid_fields": [{"type": "invalid", "field": field_name, "description": description}]},
    )


def json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object.

    :raises ProblemError: 400 for a body that is not JSON or not an object.
    """
    try:
        document = json.loads(body) if body else None
    except ValueError as exc:
        raise ProblemError(400, "Bad Request", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProblemError(400, "Bad Request", "The request body must be a JSON object")
    return document
