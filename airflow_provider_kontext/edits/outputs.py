"""Where a finished edit's outputs go: checked, then handed on as URLs or saved to ``output_path``.

Replicate deletes output files about an hour after a prediction completes, so a pipeline that
needs them later saves them. Saving is careful: a size cap, the bytes checked to be an image (a
proxy's error page is never saved as an edit), a name of our choosing (server ids sanitised), and
a temporary name renamed only once the file is complete.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_kontext.exceptions import FluxKontextError, FluxKontextInputError
from airflow_provider_kontext.models.images import (
    EXTENSIONS,
    decode_data_uri,
    is_image_content_type,
    sniff_image_type,
)

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

#: Output file names are built from the input's name and the server's prediction id, each cut to
#: this many characters.
MAX_STEM = 100
#: The largest ``data:`` output handed on through XCom when no ``output_path`` is set (decoded bytes).
MAX_INLINE_OUTPUT_BYTES = 1024 * 1024

#: Streams the output at a URL into a seekable file; returns the declared content type.
Downloader = Callable[[str, IO[bytes]], str]


class UnusableOutputError(FluxKontextError):
    """A paid prediction's output cannot be used; no retry of the task would change it.

    Not an image, malformed, not http(s), or too large to hand on.
    """


def usable_output(url: str) -> bool:
    """Tell whether an output URL the server returned may be handed on or downloaded.

    An http(s) URL with a host, or a data: URI. ``file:``, ``javascript:``, ``ftp:`` and the like
    may not.
    """
    if url[:5].lower() == "data:":
        return True
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def check_outputs(urls: list[str], *, inline_limit: int | None) -> None:
    """Refuse outputs that may not be handed on.

    :param inline_limit: the largest ``data:`` output (decoded bytes) that may travel through XCom;
        ``None`` when the outputs are saved to storage instead.
    :raises UnusableOutputError: naming the output and why.
    """
    for index, url in enumerate(urls):
        if not usable_output(url):
            scheme = url.partition(":")[0] if ":" in url else ""
            raise UnusableOutputError(
                f"output {index} is not an http(s) URL or a data: URI (scheme {scheme[:20]!r}); it is "
                "neither returned nor downloaded"
            )
        if inline_limit is not None and url[:5].lower() == "data:" and len(url) > inline_limit * 4 // 3 + 64:
            raise UnusableOutputError(
                f"output {index} is an inline data: image larger than {inline_limit} bytes, too large to "
                "hand on through XCom; set output_path to save it to storage"
            )


def storage_path(location: Any) -> ObjectStoragePath:
    """Return a recorded location as an ``ObjectStoragePath``: a URL as is, a path as a file URL.

    A relative path is taken from the working directory. No I/O.

    :raises ValueError: a location no path can be made of.
    """
    from airflow.sdk import ObjectStoragePath

    text = str(location)
    return ObjectStoragePath(text if "://" in text else Path(text).absolute().as_uri())


def output_folder(output_path: Any) -> ObjectStoragePath:
    """``output_path`` as an ``ObjectStoragePath`` (no I/O).

    :raises FluxKontextInputError: a path with a NUL byte, or a URL no file system is known for.
    """
    from airflow.sdk import ObjectStoragePath

    if isinstance(output_path, ObjectStoragePath):
        return output_path
    text = str(output_path)
    try:
        if "\x00" in text:
            raise ValueError("contains a NUL byte")
        folder = storage_path(text)
        folder.fs  # noqa: B018 (resolves the file system for the URL's scheme, or raises)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        raise FluxKontextInputError(f"output_path: cannot write to {text[:200]!r}: {exc}") from None
    return folder


def safe_stem(text: str | None) -> str:
    """``text`` reduced to characters safe in any file name, at most :data:`MAX_STEM` of them."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text or "")[:MAX_STEM]


def output_stem(input_name: str | None, prediction_id: str | None) -> str:
    """Return the start of an edit's output file names: ``<input>-<prediction id>``.

    ``mug-abc123`` for ``mug.png``, so a file leads back to both its input and its prediction;
    either part may be missing (an image given as bytes, a server that gave no id), never both (then
    ``edit-<ms>``).
    """
    stem = safe_stem(PurePosixPath(input_name).stem if input_name else None)
    parts = [part for part in (stem, safe_stem(prediction_id)) if part]
    return "-".join(parts) or f"edit-{int(time.time() * 1000)}"


def save_outputs(
    urls: list[str],
    folder: ObjectStoragePath,
    stem: str,
    *,
    download: Downloader,
    max_bytes: int,
    log: Callable[..., None],
) -> list[str]:
    """Save each output under ``folder`` and return the paths.

    Each output (a URL, fetched with ``download``, or a ``data:`` URI) goes to
    ``<folder>/<stem>.<ext>``, or ``<folder>/<stem>-<index>.<ext>`` when there are several.

    :raises UnusableOutputError: an output is malformed or not an image.
    :raises FluxKontextError: a download failed (retryable as the hook decided).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, url in enumerate(urls):
        with tempfile.TemporaryFile() as buffer:
            declared = _fetch(url, buffer, index, download=download, max_bytes=max_bytes)
            buffer.seek(0)
            kind = sniff_image_type(buffer.read(16))
            if kind is None:
                raise UnusableOutputError(f"output {index} is not a jpeg/png/gif/webp image")
            if not is_image_content_type(declared):
                raise UnusableOutputError(f"output {index} was served as {declared[:100]!r}, not as an image")
            name = f"{stem}-{index}" if len(urls) > 1 else stem
            target = folder / f"{name}.{EXTENSIONS[kind]}"
            buffer.seek(0)
            _write_atomically(buffer, target, folder / f".{name}.{EXTENSIONS[kind]}.partial")
        log("Saved output %d to %s", index, target)
        paths.append(str(target))
    return paths


def _fetch(url: str, buffer: IO[bytes], index: int, *, download: Downloader, max_bytes: int) -> str:
    """Put output ``index`` into ``buffer``; return its declared content type."""
    if not url.startswith("data:"):
        return download(url, buffer)
    try:
        buffer.write(decode_data_uri(url, max_bytes))
    except ValueError as exc:
        raise UnusableOutputError(f"output {index}: {exc}") from None
    return url[5:].partition(",")[0].split(";", 1)[0]


def _write_atomically(source: IO[bytes], target: ObjectStoragePath, partial: ObjectStoragePath) -> None:
    """Copy ``source`` to ``partial``, then rename it to ``target``; never leave a half-written file."""
    try:
        with partial.open("wb") as out:  # type: ignore[no-untyped-call]
            while chunk := source.read(1 << 20):
                out.write(chunk)
        partial.rename(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
