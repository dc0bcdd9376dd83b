"""Uploaded files: ``POST /v1/files``, list, get, delete, and signed downloads of their bytes.

Files live in memory until ``upload_ttl_seconds`` after the upload (Replicate keeps them a day);
an expired file answers 404 like a deleted one. ``GET /v1/files/{id}/download`` serves the bytes
without a token when the URL carries a valid, unexpired signature, as Replicate's signed URLs do.
A prediction's ``input_image`` may name one of these files (see ``edit_runner.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from airflow_provider_kontext.testing.lifecycle import Clock, new_id
from airflow_provider_kontext.testing.problems import ProblemError, invalid_field

#: Largest accepted upload, like Replicate's client-side limit.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    """A file uploaded with ``POST /v1/files``: its bytes, names and lifetime (wall clock)."""

    id: str
    name: str
    content_type: str
    data: bytes
    created_wall: float
    expires_wall: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Return the file as the files endpoints show it (``urls.get`` below ``base_url``)."""
        created = datetime.fromtimestamp(self.created_wall, timezone.utc)
        md5 = hashlib.md5(self.data, usedforsecurity=False).hexdigest()
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": len(self.data),
            "etag": md5,
            "checksums": {"sha256": hashlib.sha256(self.data).hexdigest(), "md5": md5},
            "metadata": dict(self.metadata),
            "created_at": _iso(created),
            "expires_at": _iso(created + timedelta(seconds=self.expires_wall - self.created_wall)),
            "urls": {"get": f"{base_url}/v1/files/{self.id}"},
        }


def _iso(moment: datetime) -> str:
    """Return ``moment`` in ISO 8601 with a ``Z`` for UTC."""
    return moment.isoformat().replace("+00:00", "Z")


class FileStore:
    """The uploaded files and their endpoints; safe to call from any thread.

    :param clock: the emulator's clock (its wall time dates uploads and expiries).
    :param ttl_seconds: how long an upload lives.
    :param owner: the account name download URLs are signed for.
    """

    def __init__(self, clock: Clock, ttl_seconds: float, owner: str) -> None:
        self._clock = clock
        self._ttl_seconds = ttl_seconds
        self._owner = owner
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        #: Signs download URLs of uploaded files (``/v1/files/{id}/download``).
        self._secret = secrets.token_bytes(32)

    def __len__(self) -> int:
        """Return how many files are stored (expired ones not yet swept included)."""
        with self._lock:
            return len(self._files)

    def clear(self) -> None:
        """Forget every file."""
        with self._lock:
            self._files.clear()

    def drop_expired(self) -> None:
        """Free the bytes of every file past its lifetime."""
        wall = self._clock.wall()
        with self._lock:
            for file_id in [i for i, f in self._files.items() if wall >= f.expires_wall]:
                del self._files[file_id]

    def upload(
        self,
        *,
        base_url: str,
        data: bytes,
        filename: str | None,
        content_type: str | None,
        metadata: str | None = None,
    ) -> dict[str, Any]:
        """Answer ``POST /v1/files`` (``metadata`` is the form field's JSON text).

        :raises ProblemError: 413 for a file over 100 MB, 422 for metadata that is not a JSON object
            or a filename over 255 characters.
        """
        if len(data) > MAX_UPLOAD_BYTES:
            raise ProblemError(413, "Content Too Large", "Files must be less than 100MB in size")
        if filename is not None and len(filename) > 255:
            raise invalid_field("filename", "must be at most 255 characters")
        try:
            meta = json.loads(metadata) if metadata else {}
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise invalid_field("metadata", "must be a JSON object")
        now = self._clock.wall()
        stored = StoredFile(
            id=new_id(),
            name=filename or "file",
            content_type=content_type or "application/octet-stream",
            data=data,
            created_wall=now,
            expires_wall=now + self._ttl_seconds,
            metadata=meta,
        )
        with self._lock:
            self._files[stored.id] = stored
        return stored.to_json(base_url)

    def get(self, file_id: str) -> StoredFile:
        """Return an uploaded file that has not expired (``GET /v1/files/{id}``).

        :raises ProblemError: 404 for an unknown, deleted or expired file.
        """
        with self._lock:
            stored = self._files.get(file_id)
            if stored is not None and self._clock.wall() >= stored.expires_wall:
                del self._files[file_id]
                stored = None
        if stored is None:
            raise ProblemError(404, "Not found", "File not found")
        return stored

    def listing(self, base_url: str) -> dict[str, Any]:
        """Answer ``GET /v1/files``: every file not expired, newest first (one page)."""
        wall = self._clock.wall()
        with self._lock:
            files = [f for f in self._files.values() if wall < f.expires_wall]
        files.sort(key=lambda f: (f.created_wall, f.id), reverse=True)
        return {"next": None, "previous": None, "results": [f.to_json(base_url) for f in files]}

    def delete(self, file_id: str) -> None:
        """Answer ``DELETE /v1/files/{id}``.

        :raises ProblemError: 404 for an unknown, deleted or expired file.
        """
        self.get(file_id)
        with self._lock:
            self._files.pop(file_id, None)

    def download_url(self, base_url: str, file_id: str, *, lifetime: float = 3600.0) -> str:
        """Return a signed ``/v1/files/{id}/download`` URL, as Replicate hands out for a file's bytes."""
        expiry = int(self._clock.wall() + lifetime)
        signature = self._signature(file_id, expiry)
        query = {"owner": self._owner, "expiry": expiry, "signature": signature}
        return f"{base_url}/v1/files/{file_id}/download?{urlencode(query)}"

    def download(self, file_id: str, owner: str, expiry: str, signature: str) -> StoredFile:
        """Answer ``GET /v1/files/{id}/download``: the file, for a valid signature not yet expired.

        :raises ProblemError: 404 otherwise (Replicate does not say which part was wrong).
        """
        try:
            expires = int(expiry)
        except ValueError:
            expires = 0
        valid = (
            owner == self._owner
            and expires > self._clock.wall()
            and hmac.compare_digest(signature, self._signature(file_id, expires))
        )
        if not valid:
            raise ProblemError(404, "Not found", "File not found")
        return self.get(file_id)

    def _signature(self, file_id: str, expiry: int) -> str:
        """Return the base64 HMAC-SHA256 that signs a download URL."""
        message = f"{self._owner} {file_id} {expiry}".encode()
        return base64.b64encode(hmac.new(self._secret, message, hashlib.sha256).digest()).decode()
