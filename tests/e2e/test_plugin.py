"""Test the plugin on a real API server (requests, no browser): who may see what, and no path traversal.

The plugin on a real API server (requests, no browser): what each user may see, and that no
request parameter reaches the file system. The browser test is ``test_plugin_browser.py``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .plugin_site import PIPELINE, Site, start_site

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with FluxKontextEmulator(prediction_seconds=0.5, start_seconds=0.1, output_scale=0.25) as emulator:
        started = start_site(tmp_path_factory.mktemp("plugin-site"), emulator)
        try:
            yield started
        finally:
            started.cluster.stop_all()


def images_of(page: str) -> list[str]:
    return [html.unescape(src) for src in re.findall(r"<img src='([^']+)'", page)]


def test_the_gallery_shows_every_edit_of_the_run_with_real_thumbnails(site: Site) -> None:
    alice = site.session("alice")
    page = alice.get(f"{site.base}/kontext/gallery", params={"dag_id": PIPELINE, "run_id": site.run_id})
    assert page.status_code == 200
    assert "3 of 3 edits" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    sources = images_of(page.text)
    assert len(sources) == 6  # before and after of each edit
    for src in sources:
        answer = alice.get(site.base + src)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/jpeg", answer.headers.get("x-kontext-unavailable")


def test_an_edits_view_shows_its_facts_and_full_images(site: Site) -> None:
    alice = site.session("alice")
    params = {"dag_id": PIPELINE, "run_id": site.run_id, "task_id": "edit", "map_index": "0"}
    page = alice.get(f"{site.base}/kontext/edit", params=params)
    assert page.status_code == 200
    for fact in ("prompt", "seed", "predict time", "succeeded", "marble table"):
        assert fact in page.text
    assert re.search(r"seed</td><td>\d+<", page.text)  # the emulator's "Using seed: N", however read
    for src in images_of(page.text):
        answer = alice.get(site.base + src)
        assert answer.headers["content-type"] == "image/png"


def test_an_unmapped_task_views_link_with_the_placeholder_map_index(site: Site) -> None:
    """The UI leaves ``{MAP_INDEX}`` in the link of a task that is not mapped."""
    params = {"dag_id": PIPELINE, "run_id": site.run_id, "task_id": "list_inputs", "map_index": "{MAP_INDEX}"}
    page = site.session("alice").get(f"{site.base}/kontext/edit", params=params)
    assert page.status_code == 200
    assert "recorded no FLUX.1 Kontext edit" in page.text


def test_a_user_who_may_not_read_the_dag_sees_nothing(site: Site) -> None:
    alice, bob, nobody = site.session("alice"), site.session("bob"), site.session(None)
    gallery = {"dag_id": PIPELINE, "run_id": site.run_id}
    src = images_of(alice.get(f"{site.base}/kontext/gallery", params=gallery).text)[0]
    assert bob.get(f"{site.base}/kontext/gallery", params=gallery).status_code == 403
    assert bob.get(site.base + src).status_code == 403
    assert nobody.get(site.base + src).status_code == 401
    assert nobody.get(f"{site.base}/kontext/recent").status_code == 401
    assert "No edits yet" in bob.get(f"{site.base}/kontext/recent").text
    recent = alice.get(f"{site.base}/kontext/recent").text
    assert recent.count("class='card'") == 3


def test_ids_from_another_dag_find_nothing(site: Site) -> None:
    """Bob may read ``kontext_sensor``: the pipeline's run and task ids under that DAG find nothing."""
    bob = site.session("bob")
    params = {
        "dag_id": "kontext_sensor",
        "run_id": site.run_id,
        "task_id": "edit",
        "map_index": "0",
        "side": "output",
    }
    assert bob.get(f"{site.base}/kontext/image", params=params).status_code == 404
    page = bob.get(f"{site.base}/kontext/gallery", params={"dag_id": "kontext_sensor", "run_id": site.run_id})
    assert "0 of 0 edits" in page.text


@pytest.mark.parametrize(
    "overrides",
    [
        {"task_id": "../../../../etc/passwd"},
        {"run_id": "/etc/passwd"},
        {"side": "../etc/passwd"},
        {"n": "7"},
        {"edit": "3"},
        {"map_index": "99"},
        {"n": "-1"},
    ],
)
def test_no_request_parameter_is_a_path(site: Site, overrides: dict[str, str]) -> None:
    params = {"dag_id": PIPELINE, "run_id": site.run_id, "task_id": "edit", "map_index": "0", "side": "input"}
    answer = site.session("alice").get(f"{site.base}/kontext/image", params={**params, **overrides})
    assert answer.status_code in (404, 422)
    assert b"root:" not in answer.content


def test_the_token_never_reaches_the_page(site: Site) -> None:
    alice = site.session("alice")
    for route, params in (
        ("gallery", {"dag_id": PIPELINE, "run_id": site.run_id}),
        ("edit", {"dag_id": PIPELINE, "run_id": site.run_id, "task_id": "edit", "map_index": "1"}),
        ("recent", {}),
    ):
        text = alice.get(f"{site.base}/kontext/{route}", params=params).text
        assert "r8_" not in text
        assert "Bearer" not in text
        assert "_token" not in text


def test_outputs_saved_by_the_run_are_what_is_shown(site: Site) -> None:
    found = sorted(Path(site.edits_dir).rglob("*.png"))
    saved = [path for path in found if ".thumbnails" not in path.parts]
    assert len(saved) == 3
    assert len(found) == 6  # and the thumbnail of each, beside it
    page = site.session("alice").get(
        f"{site.base}/kontext/edit",
        params={"dag_id": PIPELINE, "run_id": site.run_id, "task_id": "edit", "map_index": "0"},
    )
    assert any(path.as_uri() in html.unescape(page.text) for path in saved)
