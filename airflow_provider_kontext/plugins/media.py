"""Serve the images of an edit to the plugin, within bounds.

Where each is (only ever a location its task recorded), its bytes within bounds, and small
thumbnails made with Pillow and cached.

Sources: a saved output or an input image on any storage the API server can read
(``ObjectStoragePath``: local paths, ``file://``, ``s3://``, ...), an http(s) URL (the input's, or
Replicate's output URL while Replicate keeps it). What cannot be shown says why, in one word the page
shows: ``expired`` (Replicate deleted its copy), ``inline`` (a ``data:`` image, never kept),
``missing``, ``too-large``, ``not-an-image``, ``unreadable``, ``needs-pillow`` (an API server
without the ``ui`` extra: full-size images still show). No token is ever sent: output URLs
are fetched as a browser would fetch them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from airflow_provider_kontext.edits.thumbnails import THUMB_EDGE, NotAnImage, shrink_image
from airflow_provider_kontext.models.images import sniff_image_type

#: The largest image file read (bytes).
MAX_SOURCE_BYTES = 40 * 1024 * 1024
#: A thumbnail a task saved is served only up to this size (bytes); a larger file is not one.
MAX_SAVED_THUMBNAIL_BYTES = 1024 * 1024
#: The longest a fetch of one http(s) image may take (seconds): connect and each read.
FETCH_TIMEOUT = (5.0, 10.0)
#: Thumbnails (and reasons) kept in memory, newest used last.
CACHE_ENTRIES = 4096
#: How long a reason not to show an image is remembered (seconds): a file may appear later.
FAILURE_TTL = 30.0


class Unavailable(Exception):
    """An image that cannot be shown; ``str(exc)`` is the one-word reason the page shows."""


@dataclass(frozen=True)
class Picture:
    """Bytes to send and their content type."""

    data: bytes
    content_type: str


def describe(location: str | None, *, expired: bool = False) -> str | None:
    """Why ``location`` cannot be shown without reading it (``None``: it may be shown)."""
    if not location:
        return "missing"
    if location.startswith("data:"):
        return "inline"
    if expired and location.lower().startswith(("http://", "https://")):
        return "expired"
    return None


def read_bytes(location: str, *, expired: bool = False) -> Picture:
    """Return the image at ``location`` (recorded by a task), as it is.

    :raises Unavailable: why it cannot be shown.
    """
    reason = describe(location, expired=expired)
    if reason:
        raise Unavailable(reason)
    data = _fetch(location) if location.lower().startswith(("http://", "https://")) else _read(location)
    kind = sniff_image_type(data)
    if kind is None:
        raise Unavailable("not-an-image")
    return Picture(data, kind)


def _fetch(url: str) -> bytes:
    import requests

    try:
        with requests.get(url, timeout=FETCH_TIMEOUT, stream=True, allow_redirects=True) as response:
            if response.status_code in (403, 404, 410):
                raise Unavailable("expired")
            if not response.ok:
                raise Unavailable("unreadable")
            data = bytearray()
            for chunk in response.iter_content(64 * 1024):
                data += chunk
                if len(data) > MAX_SOURCE_BYTES:
                    raise Unavailable("too-large")
            return bytes(data)
    except requests.RequestException:
        raise Unavailable("unreadable") from None


def _read(location: str) -> bytes:
    from pathlib import PurePosixPath

    from airflow_provider_kontext.edits.outputs import storage_path

    if "\x00" in location or not ("://" in location or PurePosixPath(location).is_absolute()):
        raise Unavailable("missing")  # tasks record absolute paths and URLs only
    try:
        path = storage_path(location)
        with path.open("rb") as handle:  # type: ignore[no-untyped-call]
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        raise Unavailable("missing") from None
    except Exception:  # any storage backend's error: not shown, and not explained to the browser
        raise Unavailable("unreadable") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise Unavailable("too-large")
    return bytes(data)


def make_thumbnail(data: bytes, edge: int = THUMB_EDGE) -> Picture:
    """Return a JPEG (or PNG, with transparency) no larger than ``edge`` on its longest side.

    :raises Unavailable: Pillow is missing or cannot read it, or it is too large to decode.
    """
    try:
        thumbnail, content_type = shrink_image(data, edge)
    except ImportError:  # the API server lacks the ui extra: say so in place of the thumbnail
        raise Unavailable("needs-pillow") from None
    except NotAnImage as exc:
        raise Unavailable(str(exc)) from None
    return Picture(thumbnail, content_type)


def saved_thumbnail(location: str | None) -> Picture | None:
    """Return the thumbnail a task wrote beside its outputs (:mod:`~.edits.thumbnails`), if any.

    ``location`` comes from a recorded output location, never from a request. ``None`` when there is
    none or it is not a small image: the caller then makes the thumbnail itself.
    """
    if not location:
        return None
    try:
        picture = read_bytes(location)
    except Unavailable:
        return None
    return picture if len(picture.data) <= MAX_SAVED_THUMBNAIL_BYTES else None


class ThumbnailCache:
    """Thumbnails by source location, least recently used dropped first; reasons kept briefly.

    Saved outputs are named after their prediction and never rewritten, and an input read once
    is the same image for the page's purpose, so the location is the key.
    """

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self._entries = entries
        self._items: OrderedDict[str, tuple[float, Picture | str]] = OrderedDict()
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}

    def get(self, location: str, *, expired: bool = False, saved: str | None = None) -> Picture:
        """Return the thumbnail of ``location``: the one saved at ``saved``, else one made now.

        :raises Unavailable: why there is none.
        """
        cache_key = f"{'expired|' if expired else ''}{location}"
        found = self._lookup(cache_key)
        if found is None:
            with self._lock:
                busy = self._busy.setdefault(cache_key, threading.Lock())
            with busy:  # two requests for one image make one thumbnail
                found = self._lookup(cache_key)
                if found is None:
                    try:
                        found = saved_thumbnail(saved) or make_thumbnail(
                            read_bytes(location, expired=expired).data
                        )
                    except Unavailable as exc:
                        found = str(exc)
                    self._store(cache_key, found)
            with self._lock:
                self._busy.pop(cache_key, None)
        if isinstance(found, str):
            raise Unavailable(found)
        return found

    def _lookup(self, key: str) -> Picture | str | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            stored_at, value = item
            if isinstance(value, str) and time.monotonic() - stored_at > FAILURE_TTL:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return value

    def _store(self, key: str, value: Picture | str) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def placeholder(reason: str) -> Picture:
    """Return a small SVG saying why there is no image (served for ``<img>`` tags; text escaped)."""
    from html import escape

    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" viewBox="0 0 160 160">'
        '<rect width="160" height="160" fill="#eee"/><text x="80" y="85" font-family="sans-serif" '
        f'font-size="16" text-anchor="middle" fill="#666">{escape(reason)}</text></svg>'
    )
    return Picture(svg.encode(), "image/svg+xml")


def image_info(location: Any) -> str | None:
    """``location`` if it is a text location worth showing, else ``None``."""
    return location if isinstance(location, str) and location else None
