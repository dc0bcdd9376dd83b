"""Small, dependency-free facts about image files.

What a file is (by its first bytes, not by what a server or a file name claims), its extension,
data: URIs, and reading a local image.
"""

from __future__ import annotations

import base64
import errno
from pathlib import Path
from typing import IO, Any, NamedTuple

from airflow_provider_kontext.exceptions import FluxKontextInputError

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}


def sniff_image_type(data: bytes) -> str | None:
    """Return the content type of a jpeg, png, gif or webp image from its magic bytes, else ``None``."""
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
    """Tell whether a server's ``Content-Type`` (or a data: URI's media type) allows an image.

    Any ``image/*``, or a generic or missing type, does. ``text/html`` and the like do not, whatever
    the bytes look like (a proxy's error page must not be saved as an edit).
    """
    media_type = (declared or "").split(";", 1)[0].strip().lower()
    return media_type.startswith("image/") or media_type in GENERIC_CONTENT_TYPES


def to_data_uri(data: bytes, content_type: str) -> str:
    """Return ``data`` as a base64 ``data:`` URI of ``content_type``."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """Return the bytes of a ``data:`` URI (base64 or percent-encoded).

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


class LocalImage(NamedTuple):
    """An image read from local (or object) storage: its bytes, sniffed content type and file name."""

    data: bytes
    content_type: str
    name: str


def read_source(
    content: bytes | IO[bytes] | str | Path | Any, filename: str | None = None
) -> tuple[bytes, str]:
    """Return the bytes and a file name of ``content``.

    ``content`` is bytes, a binary file object, a local path, a ``file://`` URL, or an
    ``ObjectStoragePath`` (anything with ``read_bytes`` and a URL).

    :raises OSError: the storage could not be read. :raises ValueError: a NUL byte in a path.
    """
    if isinstance(content, bytes | bytearray):
        return bytes(content), filename or "input"
    if hasattr(content, "read") and not hasattr(content, "read_bytes"):
        return content.read(), filename or Path(str(getattr(content, "name", "input"))).name
    text = str(content)
    if hasattr(content, "read_bytes") and "://" in text:
        return content.read_bytes(), filename or text.rsplit("/", 1)[-1]
    path = Path(text[len("file://") :] if text.startswith("file://") else text)
    return path.read_bytes(), filename or path.name


#: Read errors that no retry mends: the path names nothing readable.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP}
)


def read_local_image(image: Any) -> LocalImage:
    """Read the image to edit, given as bytes, a path, a ``file://`` URL or an ``ObjectStoragePath``.

    :raises FluxKontextInputError: missing, a folder, not permitted, or not a jpeg, png, gif or webp
        image (permanent: no retry helps). Other I/O errors (a storage hiccup) propagate as they
        are, so Airflow's retries apply.
    """
    try:
        data, name = read_source(image)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, OSError) and exc.errno not in _PERMANENT_ERRNOS:
            raise  # a storage hiccup, not bad input: let Airflow's retries apply
        reason = getattr(exc, "strerror", None) or exc
        raise FluxKontextInputError(f"input_image: cannot read {str(image)[:200]!r}: {reason}") from None
    kind = sniff_image_type(data[:16])
    if kind is None:
        raise FluxKontextInputError(
            f"input_image: {name!r} is not a jpeg, png, gif or webp image (the model accepts only those)"
        )
    if "." not in name:
        name = f"{name}.{EXTENSIONS[kind]}"
    return LocalImage(data, kind, name)


class ImageTrace(NamedTuple):
    """What a finished edit records about its input image.

    ``where`` (a path or URL, never the bytes of a ``data:`` URI) and ``name`` (the file name, for
    output names and the UI).
    """

    where: str | None
    name: str | None


def trace_image(image: Any) -> ImageTrace:
    """Where the image to edit came from, fit for XCom, asset events and logs.

    A URL loses its user info, query and fragment (a signed URL's signature is a secret); a
    ``data:`` URI is shown as ``data:<type>,...``; bytes and file objects have no place (``None``),
    only a name when they carry one. Never raises.
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    if image is None or isinstance(image, bytes | bytearray):
        return ImageTrace(None, None)
    if hasattr(image, "read") and not hasattr(image, "read_bytes"):
        name = getattr(image, "name", None)
        return ImageTrace(None, Path(name).name if isinstance(name, str) else None)
    text = str(image)
    if text[:5].lower() == "data:":
        return ImageTrace(f"data:{text[5:].partition(',')[0].split(';', 1)[0][:100]},...", None)
    if "://" in text and text[:7].lower() != "file://":
        try:
            parts = urlsplit(text)
        except ValueError:  # e.g. a malformed IPv6 host: nothing safe to show
            return ImageTrace(None, None)
        where = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))
        return ImageTrace(where, unquote(parts.path.rstrip("/").rpartition("/")[2]) or parts.hostname)
    name = text.rstrip("/").rpartition("/")[2]
    return ImageTrace(text, name or None)
