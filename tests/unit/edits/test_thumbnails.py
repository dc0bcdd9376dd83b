"""Thumbnails saved beside a task's outputs (``edits/thumbnails.py``) and served by the plugin."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from PIL import Image

from airflow_provider_kontext.edits import thumbnails
from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.edits.results import PredictionResultMixin
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.plugins import media


def picture(path: Path, size: tuple[int, int] = (1024, 768), mode: str = "RGB") -> Path:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 60, 40) if mode == "RGB" else (200, 60, 40, 90)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_locations_derive_from_recorded_outputs_only() -> None:
    assert thumbnails.thumbnail_location("/data/run/mug-p1.png") == "/data/run/.thumbnails/mug-p1.png"
    assert (
        thumbnails.thumbnail_location("s3://bucket/run/mug-p1.png", of_input=True)
        == "s3://bucket/run/.thumbnails/mug-p1.png.input"
    )
    for never_saved in ("https://replicate.delivery/x.png", "data:image/png;base64,AA", "", "mug.png"):
        assert thumbnails.thumbnail_location(never_saved) is None


def test_outputs_and_the_input_get_small_thumbnails(tmp_path: Path) -> None:
    source = picture(tmp_path / "mug.png", (1024, 768))
    (tmp_path / "run").mkdir()
    out = picture(tmp_path / "run" / "mug-p1.png", (1024, 1024))
    logged: list[str] = []
    thumbnails.write_thumbnails([str(out)], str(source), lambda *a: logged.append(a[0] % a[1:]))
    assert logged == []
    made = Image.open(tmp_path / "run" / ".thumbnails" / "mug-p1.png")
    assert made.format == "JPEG"
    assert max(made.size) == thumbnails.THUMB_EDGE
    given = Image.open(tmp_path / "run" / ".thumbnails" / "mug-p1.png.input")
    assert given.size == (thumbnails.THUMB_EDGE, thumbnails.THUMB_EDGE * 3 // 4)
    assert not list((tmp_path / "run" / ".thumbnails").glob("*.partial"))


def test_transparency_is_kept_as_png(tmp_path: Path) -> None:
    out = picture(tmp_path / "clear.png", (400, 400), mode="RGBA")
    thumbnails.write_thumbnails([str(out)], None, print)
    assert Image.open(tmp_path / ".thumbnails" / "clear.png").format == "PNG"


def test_a_failure_is_logged_and_never_raised(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    logged: list[str] = []
    thumbnails.write_thumbnails(
        [str(broken)], "https://example.invalid/in.png", lambda *a: logged.append(a[0] % a[1:])
    )
    assert len(logged) == 1
    assert "NotAnImage" in logged[0]
    assert not (tmp_path / ".thumbnails" / "broken.png").exists()
    assert not (tmp_path / ".thumbnails" / "broken.png.input").exists()  # an http input is not fetched


def test_without_pillow_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    out = picture(tmp_path / "a.png", (64, 64))
    monkeypatch.setitem(sys.modules, "PIL", None)
    thumbnails.write_thumbnails([str(out)], str(out), print)
    assert not (tmp_path / ".thumbnails").exists()


def test_the_plugin_serves_a_saved_thumbnail_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = picture(tmp_path / "mug-p1.png", (1024, 1024))
    thumbnails.write_thumbnails([str(out)], None, print)
    saved = thumbnails.thumbnail_location(str(out))

    def no_decoding(data: bytes, edge: int = 0) -> media.Picture:
        raise AssertionError("decoded although a thumbnail was saved")

    monkeypatch.setattr(media, "make_thumbnail", no_decoding)
    served = media.ThumbnailCache().get(str(out), saved=saved)
    assert served.content_type == "image/jpeg"
    assert served.data == (tmp_path / ".thumbnails" / "mug-p1.png").read_bytes()


def test_the_plugin_makes_one_where_none_was_saved(tmp_path: Path) -> None:
    out = picture(tmp_path / "old.png", (1024, 512))
    served = media.ThumbnailCache().get(str(out), saved=thumbnails.thumbnail_location(str(out)))
    assert Image.open(io.BytesIO(served.data)).size == (thumbnails.THUMB_EDGE, thumbnails.THUMB_EDGE // 2)


def test_a_large_file_in_the_thumbnail_place_is_not_served_as_one(tmp_path: Path) -> None:
    out = picture(tmp_path / "mug.png", (64, 64))
    sidecar = tmp_path / ".thumbnails" / "mug.png"
    sidecar.parent.mkdir()
    picture(sidecar, (64, 64))
    sidecar.write_bytes(sidecar.read_bytes() + b"\0" * (media.MAX_SAVED_THUMBNAIL_BYTES + 1))
    assert media.saved_thumbnail(str(sidecar)) is None
    served = media.ThumbnailCache().get(str(out), saved=str(sidecar))
    assert Image.open(io.BytesIO(served.data)).size == (64, 64)


class _Task(PredictionResultMixin):
    """The smallest task the result step runs in: a hook that downloads a real PNG."""

    def __init__(self, output_path: Path, data: bytes) -> None:
        self.output_path = str(output_path)
        self.max_output_bytes = 10**8
        self.retry_failed_predictions = False
        self.reattach_on_retry = True
        self.log = logging.getLogger("test_thumbnails")
        self.outlets: list[object] = []
        self._hook = mock.Mock()
        self._hook.download.side_effect = lambda url, dest, max_bytes: dest.write(data) and "image/png"

    @property
    def hook(self) -> Any:
        return self._hook


def succeeded_event(prediction_id: str = "p1") -> Any:
    prediction = Prediction.model_validate(
        {"id": prediction_id, "status": "succeeded", "output": "https://replicate.delivery/x/out.png"}
    )
    return prediction_event(prediction)


@pytest.mark.parametrize("wanted", [True, False])
def test_a_task_saving_outputs_saves_their_thumbnails(tmp_path: Path, wanted: bool) -> None:
    source = picture(tmp_path / "mug.png", (800, 600))
    task = _Task(tmp_path / "run", picture(tmp_path / "result.png", (1024, 1024)).read_bytes())
    task.save_thumbnails = wanted
    (saved,) = task._keep_outputs(succeeded_event(), "mug.png", str(source))
    assert saved.endswith("/run/mug-p1.png")
    folder = tmp_path / "run" / ".thumbnails"
    made = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert made == (["mug-p1.png", "mug-p1.png.input"] if wanted else [])
