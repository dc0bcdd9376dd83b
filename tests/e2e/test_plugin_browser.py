"""Test the plugin in a real browser: headless Chromium driven by Selenium against a real API server.

The plugin in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by Selenium against a real API server. Logs in, opens a run's gallery and an edit's view
(alone and inside Airflow's UI), checks that every image loaded (``naturalWidth > 0``) and is a real
image, not a placeholder; the other user is refused. Screenshots go to ``test-artifacts/browser/``.

Marker ``browser`` (not part of ``make test``): ``pytest -m browser tests/e2e/test_plugin_browser.py``.
Skipped, saying why, without Chromium or Selenium. With ``KONTEXT_GALLERY_EDITS=300`` it also times
the first page of a run of that many edits and prints the figure (a measurement, not an assertion).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .plugin_site import PIPELINE, ROOT, Site, add_synthetic_run, start_site

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

ALL_LOADED = "return Array.from(document.images).every(i => i.complete)"
WIDTHS = "return Array.from(document.images).map(i => i.naturalWidth)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM or not DRIVER:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the browser group)")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Site]:
    with FluxKontextEmulator(prediction_seconds=0.5, start_seconds=0.1, output_scale=0.25) as emulator:
        started = start_site(tmp_path_factory.mktemp("plugin-browser"), emulator)
        try:
            yield started
        finally:
            started.cluster.stop_all()


def log_in(driver: Any, site: Site, user: str) -> None:
    """Log in as ``user``: the simple auth manager's token, set as the UI's session cookie."""
    driver.get(f"{site.base}/api/v2/version")
    driver.delete_all_cookies()
    driver.add_cookie({"name": "_token", "value": site.token(user), "path": "/"})


def wait_for_images(driver: Any, timeout: float = 60) -> float:
    """Seconds until every image of the page finished loading."""
    started = time.monotonic()
    while not driver.execute_script(ALL_LOADED):
        assert time.monotonic() - started < timeout, "images still loading"
        time.sleep(0.05)
    return time.monotonic() - started


def shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def assert_real_images(driver: Any, count: int) -> None:
    widths = driver.execute_script(WIDTHS)
    assert len(widths) == count
    assert all(width > 0 for width in widths), widths
    # A placeholder (an SVG saying why there is no image) is 160 wide; the thumbnails are not.
    assert (
        driver.execute_script("return Array.from(document.images).filter(i => i.naturalWidth === 160).length")
        == 0
    )


def test_gallery_and_edit_view_in_the_browser(browser: Any, site: Site) -> None:
    log_in(browser, site, "alice")
    browser.get(f"{site.base}/kontext/gallery?" + urlencode({"dag_id": PIPELINE, "run_id": site.run_id}))
    wait_for_images(browser)
    assert "3 of 3 edits" in browser.page_source
    assert_real_images(browser, 6)
    shot(browser, "gallery")
    browser.find_element("css selector", ".card .meta a").click()
    wait_for_images(browser)
    assert "predict time" in browser.page_source
    assert_real_images(browser, 2)
    shot(browser, "edit")


def test_the_views_inside_airflows_ui(browser: Any, site: Site) -> None:
    """The DAG run's "Image edits" tab shows the gallery in Airflow's own page."""
    log_in(browser, site, "alice")
    browser.get(f"{site.base}/dags/{PIPELINE}/runs/{site.run_id}/plugin/kontext-gallery")
    deadline = time.monotonic() + 60
    frames: list[Any] = []
    while not frames and time.monotonic() < deadline:
        frames = browser.find_elements("css selector", "iframe")
        time.sleep(0.2)
    assert frames, "no plugin frame in the DAG run page"
    browser.switch_to.frame(frames[0])
    try:
        while "edits" not in browser.page_source and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_for_images(browser)
        assert_real_images(browser, 6)
    finally:
        browser.switch_to.default_content()
    shot(browser, "gallery-in-airflow")


def test_the_other_user_is_refused(browser: Any, site: Site) -> None:
    log_in(browser, site, "bob")
    browser.get(f"{site.base}/kontext/gallery?" + urlencode({"dag_id": PIPELINE, "run_id": site.run_id}))
    assert "Forbidden" in browser.page_source or "403" in browser.page_source
    assert browser.execute_script("return document.images.length") == 0
    shot(browser, "refused")


def test_first_page_of_a_large_run(browser: Any, site: Site, tmp_path: Path) -> None:
    """Time the first page of a run of N edits, thumbnails saved by the tasks or not (printed)."""
    count = int(os.environ.get("KONTEXT_GALLERY_EDITS", "60"))
    from PIL import Image

    output, source = tmp_path / "out.png", tmp_path / "in.png"
    for path, size in ((output, (1024, 1024)), (source, (1024, 768))):
        buffer = io.BytesIO()
        Image.effect_noise(size, 60).convert("RGB").save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
    log_in(browser, site, "alice")
    timings = {}
    for saved in (False, True):
        run_id = f"synthetic_{'saved' if saved else 'made'}_{count}"
        add_synthetic_run(site, run_id, count, output, source, thumbnails=saved)
        started = time.monotonic()
        browser.get(f"{site.base}/kontext/gallery?" + urlencode({"dag_id": PIPELINE, "run_id": run_id}))
        loaded = time.monotonic() - started + wait_for_images(browser, timeout=120)
        images = browser.execute_script("return document.images.length")
        assert_real_images(browser, images)
        shot(browser, f"gallery-{count}-{'saved' if saved else 'made'}")
        started = time.monotonic()
        browser.refresh()
        cached = time.monotonic() - started + wait_for_images(browser)
        timings[saved] = loaded
        print(
            f"\nGALLERY first page of {count} edits, thumbnails "
            f"{'saved by the tasks' if saved else 'made on view'}: "
            f"{images} images in {loaded:.2f}s cold, {cached:.2f}s warm"
        )
    print(
        f"GALLERY cold first page, made on view / saved by the tasks: {timings[False] / timings[True]:.1f}x"
    )
