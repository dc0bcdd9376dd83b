"""Test the plugin's pages and images without a server.

The plugin's pages and images without a server: escaping, links built from ids only, the reasons
an image is not shown, and bounded, cached thumbnails.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from airflow_provider_kontext.plugins import media, pages
from airflow_provider_kontext.plugins.records import Edit, TaskKey

EVIL = "<script>alert('x')</script>\"'&"


def png(size: tuple[int, int] = (640, 480), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 20, 30) if mode == "RGB" else (10, 20, 30, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def edit(**summary: object) -> Edit:
    base: dict[str, object] = {"id": "p1", "status": "succeeded", "outputs": ["/data/out.png"]}
    return Edit(TaskKey("dag", "run+1", "edit", 2), 0, {**base, **summary}, "success", "mug.png")


def test_every_recorded_text_is_escaped() -> None:
    e = edit(
        prompt=EVIL, model=EVIL, input_image=EVIL, input_name=EVIL, seed=EVIL, web_url="javascript:" + EVIL
    )
    html = pages.edit_page("/kontext", [e], EVIL) + pages.card("/kontext", e)
    assert "<script>" not in html
    assert "javascript:" not in html  # only http(s) links leave the page
    assert "&lt;script&gt;" in html


def test_links_carry_ids_only_url_encoded() -> None:
    html = pages.card("/kontext", edit())
    assert "/kontext/edit?dag_id=dag&amp;run_id=run%2B1&amp;task_id=edit&amp;map_index=2" in html
    assert "/kontext/image?dag_id=dag&amp;run_id=run%2B1&amp;task_id=edit&amp;map_index=2&amp;edit=0" in html
    assert "/data/out.png'" not in html.split("<table")[0]  # no location in any link


def test_failed_and_expired_edits_say_so() -> None:
    failed = Edit(
        TaskKey("d", "r", "edit"), 0, {"id": "p2", "web_url": "https://replicate.com/p/p2"}, "failed"
    )
    failed.finished = False
    html = pages.edit_page("/k", [failed], "t")
    assert "st-failed" in html
    assert "no result recorded" in html
    assert "https://replicate.com/p/p2" in html
    gone = edit(outputs=["https://replicate.delivery/x.png"], urls_expire_at="2020-01-01T00:00:00+00:00")
    assert ">expired<" in pages.card("/k", gone)
    assert ">inline<" in pages.card("/k", edit(input_image="data:image/png,..."))


def test_the_seed_is_shown_or_said_unknown() -> None:
    assert "<td>4242</td>" in pages.details(edit(seed=4242))
    assert "not reported" in pages.details(edit())


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("data:image/png,...", "inline"),
        ("relative/out.png", "missing"),  # tasks record absolute paths and URLs only
        ("/nonexistent/kontext/out.png", "missing"),
        ("/etc/hostname", "not-an-image"),  # a recorded file that is no image is never served
        ("/dev/null\x00.png", "missing"),
    ],
)
def test_what_cannot_be_shown_says_why(location: str | None, reason: str) -> None:
    with pytest.raises(media.Unavailable, match=reason):
        media.read_bytes(location)  # type: ignore[arg-type]


def test_expired_replicate_urls_are_not_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "_fetch", lambda url: pytest.fail("fetched"))
    with pytest.raises(media.Unavailable, match="expired"):
        media.read_bytes("https://replicate.delivery/x.png", expired=True)


def test_thumbnails_are_small_cached_and_keep_transparency(tmp_path: Path) -> None:
    photo, clear = tmp_path / "photo.png", tmp_path / "clear.png"
    photo.write_bytes(png((2000, 1000)))
    clear.write_bytes(png((400, 400), "RGBA"))
    cache = media.ThumbnailCache(entries=1)
    thumb = cache.get(str(photo))
    assert thumb.content_type == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.data)).size == (media.THUMB_EDGE, media.THUMB_EDGE // 2)
    photo.unlink()
    assert cache.get(str(photo)) is thumb  # served from the cache
    assert cache.get(str(clear)).content_type == "image/png"
    assert len(cache) == 1  # the oldest was dropped


def test_a_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_kontext.edits import thumbnails

    monkeypatch.setattr(thumbnails, "MAX_PIXELS", 100)
    with pytest.raises(media.Unavailable, match="too-large"):
        media.make_thumbnail(png((20, 20)))


def test_the_placeholder_escapes_its_reason() -> None:
    picture = media.placeholder(EVIL)
    assert picture.content_type == "image/svg+xml"
    assert b"<script>" not in picture.data


def test_the_plugin_is_registered_with_its_views() -> None:
    from airflow_provider_kontext.get_provider_info import get_provider_info
    from airflow_provider_kontext.plugins import kontext

    (plugin,) = get_provider_info()["plugins"]
    assert plugin["plugin-class"].endswith("FluxKontextEditsPlugin")
    assert {v["destination"] for v in kontext.EXTERNAL_VIEWS} == {"task_instance", "dag_run", "nav"}
    assert all(
        not v["href"].startswith(("/", "http")) for v in kontext.EXTERNAL_VIEWS
    )  # relative to base_url
    if not kontext._SUPPORTED:  # an Airflow without fastapi_apps / external_views: a plugin without them
        assert kontext.FluxKontextEditsPlugin.fastapi_apps == []
        return
    assert kontext.FluxKontextEditsPlugin.external_views == kontext.EXTERNAL_VIEWS
    assert kontext.FluxKontextEditsPlugin.fastapi_apps[0]["url_prefix"] == kontext.URL_PREFIX


def test_a_batchs_rows_are_read_from_every_part_with_the_shared_fields() -> None:
    from airflow_provider_kontext.edits.batch_results import counts_of, xcom_values
    from airflow_provider_kontext.plugins.records import _summaries

    rows = [
        {
            "index": n,
            "input_name": f"shot{n}.png",
            "prompt": "blue",
            "model": "o/m",
            "status": "succeeded",
            "prediction": f"p{n}",
            "outputs": [f"/out/shot{n}.png"],
        }
        for n in range(30)
    ]
    values = xcom_values(rows, counts_of(rows), None, part_bytes=1_000)
    assert len(values["batch"]["parts"]) > 2
    found = _summaries(values)
    assert found == rows
    edits = [Edit(TaskKey("d", "r", "edit_all"), n, summary) for n, summary in enumerate(found)]
    assert "blue" in pages.edit_page("/k", edits[:1], "t")
    assert _summaries({"predictions": rows[:2]}) == rows[:2]  # recorded before the rows were split
