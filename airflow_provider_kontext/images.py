"""Small, dependency-free facts about image files: what a file is (by its first bytes, not by what a
server or a file name claims), its extension, and data: URIs."""

from __future__ import annotations

import base64

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}


def sniff_image_type(data: bytes) -> str | None:
    """The content type of a jpeg, png, gif or webp image from its magic bytes, else ``None``."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


#: Declared content types that say nothing about the file (the bytes then decide alone).
GENERIC_CONTENT_TYPES = ("", "application/octet-stream", "binary/octet-stream")


def is_image_content_type(declared: str | None) -> bool:
    """Whether a server's ``Content-Type`` (or a data: URI's media type) allows an image: any
    ``image/*``, or a generic or missing type. ``text/html`` and the like do not, whatever the bytes
    look like (a proxy's error page must not be saved as an edit)."""
    media_type = (declared or "").split(";", 1)[0].strip().lower()
    return media_type.startswith("image/") or media_type in GENERIC_CONTENT_TYPES


def to_data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded).

    :raises ValueError: not a data: URI, malformed, or larger than ``max_bytes``.
    """
    from urllib.parse import unquote_to_bytes

    if not uri.startswith("data:") or "," not in uri:
        raise ValueError("not a data: URI")
    header, _, payload = uri[5:].partition(",")
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise ValueError(f"data: URI holds more than {max_bytes} bytes")
    try:
        data = (
            base64.b64decode(payload, validate=True)
            if header.endswith(";base64")
            else unquote_to_bytes(payload)
        )
    except ValueError as exc:
        raise ValueError(f"malformed data: URI ({exc})") from None
    if len(data) > max_bytes:
        raise ValueError(f"data: URI holds more than {max_bytes} bytes")
    return data
