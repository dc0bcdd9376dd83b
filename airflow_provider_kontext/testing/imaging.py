"""The emulator's stand-in for a Kontext edit: a real, deterministic Pillow operation.

It does what the model does to the image's geometry (snap to one of Kontext's ~1 MP sizes, or the
size of the requested aspect ratio) and applies a visible change driven by the prompt and seed: a
colour tint derived from a hash of both, a few keyword effects (``mirror``, ``blur``, ``black and
white``, ``invert``, ``sepia``) and the prompt written in a banner. The same inputs always give the
same bytes, so a test can compare outputs and a human can see which prompt produced a file.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, UnidentifiedImageError

#: The sizes (width, height) Kontext was trained on; the model snaps an input image to the nearest.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)

#: Output size (width, height) of each named ``aspect_ratio``: 1:1 and 16:9 as the real model
#: answers, the others the preset nearest the ratio (``2:1``/``1:2`` exist on pro/max only).
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1328, 800),
    "9:16": (800, 1328),
    "21:9": (1568, 672),
    "9:21": (672, 1568),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "4:3": (1184, 880),
    "3:4": (880, 1184),
    "5:4": (1104, 944),
    "4:5": (944, 1104),
    "2:1": (1456, 720),
    "1:2": (720, 1456),
}

#: Pillow format names the model accepts for ``input_image`` (jpeg, png, gif, webp).
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")

#: ``output_format`` -> (Pillow format, content type).
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "webp": ("WEBP", "image/webp"),
    "jpg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
}

#: Keyword -> effect, applied in this order when the lower-cased prompt contains the keyword.
_EFFECTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("black and white", "grayscale", "greyscale", "monochrome"), "grayscale"),
    (("sepia", "vintage"), "sepia"),
    (("mirror", "flip"), "mirror"),
    (("blur", "soften"), "blur"),
    (("invert", "negative"), "invert"),
)

_TINT_STRENGTH = 0.3
_BANNER_SHADE = 0.55


class ImageError(Exception):
    """The input image cannot be used; the message becomes the failed prediction's ``error``."""


@dataclass(frozen=True)
class EditedImage:
    """An encoded output image and what a server needs to serve it."""

    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


def nearest_resolution(width: int, height: int) -> tuple[int, int]:
    """Return the Kontext preset whose aspect ratio is nearest ``width / height`` (the model's own rule)."""
    ratio = width / height
    return min(KONTEXT_RESOLUTIONS, key=lambda size: abs(ratio - size[0] / size[1]))


def output_size(aspect_ratio: str, input_size: tuple[int, int] | None, scale: float = 1.0) -> tuple[int, int]:
    """Return the output size for ``aspect_ratio``, times ``scale``.

    ``match_input_image`` uses ``input_size``; without an input image it means 1:1, as on
    flux-kontext-pro.
    """
    if aspect_ratio in ASPECT_RATIO_SIZES:
        width, height = ASPECT_RATIO_SIZES[aspect_ratio]
    elif aspect_ratio == "match_input_image":
        width, height = nearest_resolution(*input_size) if input_size else ASPECT_RATIO_SIZES["1:1"]
    else:
        raise ImageError(f"unknown aspect_ratio {aspect_ratio!r}")
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_data_uri(uri: str) -> bytes:
    """Return the bytes of a ``data:`` URI (base64 or percent-encoded).

    :raises ImageError: not a well-formed data URI.
    """
    if not uri.startswith("data:"):
        raise ImageError("not a data: URI")
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise ImageError("input_image is a malformed data: URI (no comma before the data)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"input_image is a data: URI with invalid base64 data ({exc})") from None
    return unquote_to_bytes(payload)


def open_image(data: bytes) -> Image.Image:
    """Decode ``data`` as jpeg, png, gif or webp (the first frame of an animation) into RGB.

    :raises ImageError: anything else, naming the format when Pillow recognises it.
    """
    if not data:
        raise ImageError("input_image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as image:
            image.seek(0)
            image.load()
            converted = _to_rgb(image)
    except UnidentifiedImageError:
        raise ImageError(
            f"input_image must be a jpeg, png, gif or webp image; got {_describe_bytes(data)}"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"input_image could not be decoded: {exc}") from None
    return converted


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _describe_bytes(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as other:
            return f"a {other.format} image"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        pass
    head = data[:64].lstrip()
    if head[:1] in (b"<", b"{", b"["):
        return "text (an HTML or JSON document?), not an image"
    return f"{len(data)} bytes that are not an image"


def tint_for(prompt: str, seed: int) -> tuple[int, int, int]:
    """Return the tint colour of ``prompt`` and ``seed``: stable across runs and machines."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def edit_image(
    source: bytes | None,
    *,
    prompt: str,
    seed: int,
    aspect_ratio: str = "match_input_image",
    output_format: str = "webp",
    output_quality: int = 80,
    scale: float = 1.0,
) -> EditedImage:
    """Edit ``source`` (or, without one, generate a seed-driven gradient) and encode the result.

    :raises ImageError: the source is not an accepted image, or an option is unknown.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ImageError(f"unknown output_format {output_format!r}")
    original = open_image(source) if source is not None else None
    size = output_size(aspect_ratio, original.size if original else None, scale)
    if original is not None:
        image = ImageOps.fit(original, size, Image.Resampling.LANCZOS)
    else:
        image = _generate(size, prompt, seed)
    image = _apply_effects(image, prompt)
    image = Image.blend(image, Image.new("RGB", image.size, tint_for(prompt, seed)), _TINT_STRENGTH)
    _draw_banner(image, f"{prompt.strip()}  ·  seed {seed}")
    return _encode(image, output_format, output_quality)


def warm_up() -> None:
    """Run one tiny edit so Pillow's plugins and the banner font are loaded in advance.

    The first prediction then does not pay for loading them.
    """
    edit_image(None, prompt="warm up", seed=1, aspect_ratio="1:1", scale=0.05)


def _generate(size: tuple[int, int], prompt: str, seed: int) -> Image.Image:
    digest = hashlib.sha256(f"generate\x00{prompt}\x00{seed}".encode()).digest()
    gradient = Image.linear_gradient("L").rotate(digest[6] % 360).resize(size)
    return ImageOps.colorize(gradient, (digest[0], digest[1], digest[2]), (digest[3], digest[4], digest[5]))


def _apply_effects(image: Image.Image, prompt: str) -> Image.Image:
    lowered = prompt.lower()
    for keywords, effect in _EFFECTS:
        if not any(word in lowered for word in keywords):
            continue
        if effect == "grayscale":
            image = ImageOps.grayscale(image).convert("RGB")
        elif effect == "sepia":
            image = ImageOps.colorize(ImageOps.grayscale(image), (40, 26, 13), (255, 240, 192))
        elif effect == "mirror":
            image = ImageOps.mirror(image)
        elif effect == "blur":
            image = image.filter(ImageFilter.GaussianBlur(max(1.0, image.width / 200)))
        elif effect == "invert":
            image = ImageOps.invert(image)
    return image


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_banner(image: Image.Image, text: str) -> None:
    """Shade a strip along the bottom and write ``text`` in it, shortened to fit."""
    width, height = image.size
    banner = max(10, round(height * 0.09))
    if banner >= height:
        return
    box = (0, height - banner, width, height)
    strip = image.crop(box)
    image.paste(Image.blend(strip, Image.new("RGB", strip.size, (0, 0, 0)), _BANNER_SHADE), box)
    draw = ImageDraw.Draw(image)
    font = _font(max(6, round(banner * 0.6)))
    margin = max(2, banner // 4)
    shown = _fit(draw, " ".join(text.split())[:300], font, width - 2 * margin)
    draw.text((margin, height - banner / 2), shown, fill=(255, 255, 255), font=font, anchor="lm")


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, room: int
) -> str:
    if draw.textlength(text, font=font) <= room:
        return text
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle] + "…", font=font) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…" if low else ""


def _encode(image: Image.Image, output_format: str, quality: int) -> EditedImage:
    pillow_format, content_type = OUTPUT_FORMATS[output_format]
    buffer = io.BytesIO()
    if pillow_format == "PNG":
        image.save(buffer, format="PNG")
    elif pillow_format == "WEBP":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return EditedImage(
        data=buffer.getvalue(),
        content_type=content_type,
        extension=output_format,
        width=image.width,
        height=image.height,
    )
