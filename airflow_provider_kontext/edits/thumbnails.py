"""Write small thumbnails beside saved outputs, so the UI shows a run's edits without decoding them.

A task that saves its outputs (``output_path``) also writes, when Pillow is installed (the ``ui``
extra), one thumbnail per output and one of its input image, in a ``.thumbnails`` folder beside the
outputs: ``<folder>/.thumbnails/<output file name>`` and ``<folder>/.thumbnails/<first output file
name>.input``. The plugin finds them from the locations the task recorded (never from a request),
so a gallery page serves small files instead of decoding full-size images on the API server.

A thumbnail is a convenience: any failure to write one is logged and the edit goes on; the plugin
then makes the thumbnail itself, as it does for edits saved without one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

#: Longest edge of a thumbnail (pixels).
THUMB_EDGE = 320
#: The most pixels Pillow decodes (a decompression bomb is refused, not decoded).
MAX_PIXELS = 64_000_000
#: The largest input image read to make its thumbnail (bytes).
MAX_INPUT_BYTES = 40 * 1024 * 1024
#: The folder, beside the outputs, that holds their thumbnails.
FOLDER = ".thumbnails"


class NotAnImage(ValueError):
    """Pillow cannot read the bytes, or the image has more than :data:`MAX_PIXELS`."""


def shrink_image(data: bytes, edge: int = THUMB_EDGE) -> tuple[bytes, str]:
    """Return a JPEG (or a PNG, where the image has transparency) no larger than ``edge`` a side.

    :raises ImportError: Pillow is not installed.
    :raises NotAnImage: Pillow cannot read ``data``, or it has more than :data:`MAX_PIXELS` pixels.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise NotAnImage("too-large")
            image.draft("RGB", (edge, edge))  # a JPEG decodes at a fraction of its size
            image.thumbnail((edge, edge), reducing_gap=2.0)
            keep_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
            out = io.BytesIO()
            if keep_alpha:
                image.convert("RGBA").save(out, format="PNG", optimize=False)
                return out.getvalue(), "image/png"
            image.convert("RGB").save(out, format="JPEG", quality=82)
            return out.getvalue(), "image/jpeg"
    except NotAnImage:
        raise
    except (OSError, ValueError, Image.DecompressionBombError):
        raise NotAnImage("not-an-image") from None


def thumbnail_location(saved: str, *, of_input: bool = False) -> str | None:
    """Return where the thumbnail of a saved output (or of its edit's input) is kept.

    ``saved`` is an output location a task recorded (a local path or a storage URL); ``None`` for
    anything else (an http(s) URL, a ``data:`` URI): such outputs were never saved, so have none.
    """
    if not saved or saved.startswith("data:") or saved.lower().startswith(("http://", "https://")):
        return None
    head, _, name = saved.rstrip("/").rpartition("/")
    if not head or not name:
        return None
    return f"{head}/{FOLDER}/{name}{'.input' if of_input else ''}"


def write_thumbnails(saved: list[str], input_image: Any, log: Callable[..., None]) -> None:
    """Write the thumbnails of the outputs just saved and of their input image; log any failure.

    The input's thumbnail is made only from a local path or a storage location (an http(s) input is
    not fetched again: the plugin makes that one itself).
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        return  # no ui extra on the worker: the plugin makes thumbnails when asked
    sources: list[tuple[str, Any]] = [(path, path) for path in saved]
    if saved and _readable_location(input_image):
        sources.append((saved[0], input_image))
    for index, (output, source) in enumerate(sources):
        target = thumbnail_location(output, of_input=index == len(saved))
        if target is None:
            continue
        try:
            _write(source, target)
        except Exception as exc:  # a thumbnail never costs the edit: the plugin can make it later
            log("No thumbnail for %s: %s", target, f"{type(exc).__name__}: {exc}"[:300])


def _readable_location(image: Any) -> bool:
    if isinstance(image, PurePosixPath) or hasattr(image, "read_bytes"):
        return True
    if not isinstance(image, str) or not image or image.startswith("data:"):
        return False
    return not image.lower().startswith(("http://", "https://"))


def _write(source: Any, target: str) -> None:
    from airflow_provider_kontext.edits.outputs import storage_path as storage

    with storage(source).open("rb") as handle:  # type: ignore[no-untyped-call]
        data = handle.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise NotAnImage("too-large")
    thumbnail, _ = shrink_image(bytes(data))
    path = storage(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = storage(f"{target}.partial")
    with partial.open("wb") as out:  # type: ignore[no-untyped-call]
        out.write(thumbnail)
    partial.rename(path)
