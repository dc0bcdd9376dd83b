"""List the images of a batch of edits, pair them with their prompts, and check them before paying.

``input_images`` is a list of anything ``input_image`` takes (URLs, data: URIs, local paths,
``ObjectStoragePath`` objects, bytes), or one folder or object-storage prefix whose images are
listed at run time (sorted by name). ``prompt`` is one string for all images or a list with one per
image. Every image is checked (read and sniffed, inputs validated against the model's schema)
before the first create; the image bytes are then dropped and read again when its create is sent,
so a batch of thousands holds one image in memory at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from airflow_provider_kontext.edits.request import validated_request
from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.models.images import EXTENSIONS, trace_image

#: File name endings listed as images in a folder or prefix.
IMAGE_SUFFIXES = frozenset({f".{ext}" for ext in EXTENSIONS.values()} | {".jpeg"})
#: How many bad images a failure message lists by name.
MAX_LISTED = 20


class BatchItem(NamedTuple):
    """One image of the batch.

    Its position, the image as given, its prompt, where it came from and its file name (for output
    names), and the request's fingerprint.
    """

    position: int
    image: Any
    prompt: str
    where: str | None
    name: str | None
    fingerprint: str


def resolve_images(input_images: Any) -> list[Any]:
    """Return the images to edit: the list as given, or the images listed in a folder or prefix.

    :raises FluxKontextInputError: not a list, folder or prefix; an empty list or folder.
    """
    if isinstance(input_images, list | tuple):
        images = list(input_images)
    elif isinstance(input_images, str) or hasattr(input_images, "iterdir"):
        images = _listed(input_images)
    else:
        raise FluxKontextInputError(
            "input_images: must be a list of images, or a folder or object-storage prefix to list, "
            f"got {type(input_images).__name__}"
        )
    if not images:
        raise FluxKontextInputError(f"input_images: no images in {str(input_images)[:200]!r}")
    return images


def _listed(folder: Any) -> list[Any]:
    """List the images in a folder (local path, ``file://`` URL, object-storage URL or path), by name."""
    from airflow.sdk import ObjectStoragePath

    if isinstance(folder, str) and folder[:5].lower() in ("http:", "https", "data:"):
        raise FluxKontextInputError("input_images: a single image URL is not a list; pass [url]")
    path = folder if hasattr(folder, "iterdir") else ObjectStoragePath(folder)
    try:
        entries = sorted(path.iterdir(), key=lambda entry: str(entry))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FluxKontextInputError(f"input_images: cannot list {str(folder)[:200]!r}: {exc}") from None
    return [entry for entry in entries if entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()]


def resolve_prompts(prompt: Any, count: int) -> list[str]:
    """One prompt per image. :raises FluxKontextInputError: a list of another length, or not strings."""
    if isinstance(prompt, str):
        return [prompt] * count
    if isinstance(prompt, list | tuple):
        if len(prompt) != count:
            raise FluxKontextInputError(
                f"prompt: a list of prompts needs one per image: {len(prompt)} prompts for {count} images"
            )
        if not all(isinstance(p, str) for p in prompt):
            raise FluxKontextInputError("prompt: every prompt in the list must be a string")
        return list(prompt)
    raise FluxKontextInputError(f"prompt: must be a string or a list of strings, got {type(prompt).__name__}")


def checked_items(
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    model: str,
    arguments: dict[str, Any],
    extra_input: Any,
    output_path: Any,
    seed_from: str | None = None,
) -> list[BatchItem]:
    """Every image checked and fingerprinted (each read once, then dropped).

    With ``seed_from``, an image whose edit gives no seed gets one drawn (``edits.request.drawn_seed``).

    :raises FluxKontextInputError: listing the bad images by index and name and why (all of them, up to
        :data:`MAX_LISTED`), so one fix mends the batch.
    """
    items: list[BatchItem] = []
    problems: list[str] = []
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        where, name = trace_image(image)
        try:
            request = validated_request(
                model, {**arguments, "prompt": prompt}, image, extra_input, output_path, seed_from
            )
        except FluxKontextInputError as exc:
            problems.append(f"image {index} ({name or where or type(image).__name__}): {exc}")
            continue
        if request.image is not None and not name:
            name = request.image.name
        items.append(BatchItem(index, image, prompt, where, name, request.fingerprint))
    if problems:
        listed = "\n".join(problems[:MAX_LISTED])
        more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise FluxKontextInputError(
            f"{len(problems)} of {len(images)} images are not usable:\n{listed}{more}"
        )
    return items
