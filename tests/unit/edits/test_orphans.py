"""Test the search for a prediction an earlier try created but did not record (``orphans.py``).

The search for a prediction an earlier try created but did not record (``orphans.py``): what
matches (model, input, the image as the list shows it), what is ambiguous, and what it costs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from emulated import png

from airflow_provider_kontext.edits.orphans import (
    CLOCK_MARGIN,
    Wanted,
    file_id_of,
    find_orphan,
    search_with_hook,
    wanted_for,
)
from airflow_provider_kontext.models import PredictionPage
from airflow_provider_kontext.models.images import LocalImage

MODEL = "black-forest-labs/flux-kontext-dev"
SINCE = datetime(2026, 12, 6, 1, 0, tzinfo=timezone.utc)
INPUT = {"prompt": "Make it snowy", "input_image": "https://example.com/cat.png", "aspect_ratio": "1:1"}
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
FILES = "https://api.replicate.com/v1/files/"


def item(pid: str, model: str = MODEL, **input: Any) -> dict[str, Any]:
    return {
        "id": pid,
        "model": model,
        "version": "hidden",
        "status": "processing",
        "input": {**INPUT, **input},
        "created_at": (SINCE + timedelta(seconds=1)).isoformat(),
        "urls": {"get": f"https://api.replicate.com/v1/predictions/{pid}"},
    }


class Pages:
    """Serves ``pages`` one after another (a list of result lists), recording each request."""

    def __init__(self, *pages: list[dict[str, Any]]) -> None:
        self.pages = pages
        self.requests: list[tuple[str | None, str | None, str | None]] = []

    def __call__(self, after: str | None, before: str | None, cursor: str | None) -> PredictionPage:
        self.requests.append((after, before, cursor))
        index = len(self.requests) - 1
        more = index + 1 < len(self.pages)
        return PredictionPage(
            results=self.pages[index],
            next=f"https://api.replicate.com/v1/predictions?cursor=c{index + 1}" if more else None,
        )


def test_exactly_one_match_is_adopted_from_the_window_start_less_the_clock_margin():
    pages = Pages([item("other", prompt="Another edit"), item("ours")])
    found = find_orphan(pages, Wanted(MODEL, INPUT), since=SINCE)
    assert found.prediction is not None
    assert found.prediction.id == "ours"
    assert "only one of the 2 predictions" in found.reason
    assert pages.requests == [((SINCE - CLOCK_MARGIN).isoformat(), None, None)]


def test_no_match_adopts_nothing_and_says_why():
    found = find_orphan(Pages([item("other", prompt="Another edit")]), Wanted(MODEL, INPUT), since=SINCE)
    assert found.prediction is None
    assert "none of the 1 prediction created since" in found.reason


def test_two_matches_are_ambiguous():
    found = find_orphan(Pages([item("a"), item("b")]), Wanted(MODEL, INPUT), since=SINCE)
    assert found.prediction is None
    assert "2 of the 2 predictions" in found.reason
    assert "a, b" in found.reason


def test_another_model_or_version_does_not_match():
    pages = Pages([item("pro", model="black-forest-labs/flux-kontext-pro")])
    assert find_orphan(pages, Wanted(MODEL, INPUT), since=SINCE).prediction is None
    other_version = {**item("v1"), "version": "1111"}
    assert find_orphan(Pages([other_version]), Wanted(f"{MODEL}:2222", INPUT), since=SINCE).prediction is None
    same_version = {**item("v2"), "version": "2222"}
    found = find_orphan(Pages([same_version]), Wanted(f"{MODEL}:2222", INPUT), since=SINCE)
    assert found.prediction is not None
    assert found.prediction.id == "v2"


@pytest.mark.parametrize(
    "change",
    [{"aspect_ratio": "16:9"}, {"seed": 7}, {"input_image": "https://example.com/dog.png"}],
)
def test_any_other_input_does_not_match(change):
    assert find_orphan(Pages([item("x", **change)]), Wanted(MODEL, INPUT), since=SINCE).prediction is None


def test_a_prediction_whose_data_was_removed_does_not_match():
    removed = {**item("gone"), "input": {}, "data_removed": True}
    assert find_orphan(Pages([removed]), Wanted(MODEL, INPUT), since=SINCE).prediction is None


def test_inline_image_matches_as_the_same_data_uri_and_not_when_listed_cut_short():
    wanted = wanted_for(
        MODEL,
        {**INPUT, "input_image": "data:image/png;base64,"},
        LocalImage(PNG, "image/png", "cat.png"),
        1024,
    )
    assert wanted.input["input_image"] == DATA_URI
    assert wanted.upload_sha256 is None
    found = find_orphan(Pages([item("inline", input_image=DATA_URI)]), wanted, since=SINCE)
    assert found.prediction is not None
    assert found.prediction.id == "inline"
    cut = find_orphan(Pages([item("cut", input_image=DATA_URI[:40] + "...")]), wanted, since=SINCE)
    assert cut.prediction is None
    assert "1 differ only in the image" in cut.reason


def test_uploaded_image_matches_by_the_files_sha256():
    image = LocalImage(PNG, "image/png", "cat.png")
    wanted = wanted_for(MODEL, {**INPUT, "input_image": "data:image/png;base64,"}, image, 10)
    assert "input_image" not in wanted.input
    assert wanted.upload_sha256 == hashlib.sha256(PNG).hexdigest()
    digests = {FILES + "mine": hashlib.sha256(PNG).hexdigest(), FILES + "theirs": "0" * 64}
    asked: list[str] = []

    def file_sha256(url: str) -> str | None:
        asked.append(url)
        return digests.get(url)

    pages = Pages(
        [
            item("theirs", input_image=FILES + "theirs"),
            item("mine", input_image=FILES + "mine"),
            item("other-prompt", prompt="x", input_image=FILES + "mine"),
        ]
    )
    found = find_orphan(pages, wanted, since=SINCE, file_sha256=file_sha256)
    assert found.prediction is not None
    assert found.prediction.id == "mine"
    assert asked == [FILES + "theirs", FILES + "mine"]  # only candidates matching all but the image


def test_uploaded_image_without_a_way_to_read_the_file_matches_nothing():
    wanted = Wanted(MODEL, {k: v for k, v in INPUT.items() if k != "input_image"}, "ab" * 32)
    found = find_orphan(Pages([item("mine", input_image=FILES + "mine")]), wanted, since=SINCE)
    assert found.prediction is None


def test_pages_are_followed_by_cursor():
    pages = Pages([item(f"p{i}", prompt=f"edit {i}") for i in range(100)], [item("ours")])
    found = find_orphan(pages, Wanted(MODEL, INPUT), since=SINCE)
    assert found.prediction is not None
    assert found.prediction.id == "ours"
    assert [request[2] for request in pages.requests] == [None, "c1"]
    assert "101 predictions" in found.reason


def test_a_window_larger_than_the_page_limit_is_not_adopted_from():
    pages = Pages([item("ours")], [item("x", prompt="x")], [item("y", prompt="y")])
    found = find_orphan(pages, Wanted(MODEL, INPUT), since=SINCE, max_pages=2)
    assert found.prediction is None
    assert len(pages.requests) == 2
    assert "not searched to its end" in found.reason


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        (FILES + "abc123", "https://api.replicate.com", "abc123"),
        ("https://proxy.example/replicate/v1/files/f1", "https://proxy.example/replicate", "f1"),
        ("https://proxy.example/replicate/v1/files/f1", "https://proxy.example/replicate/v1", "f1"),
        ("https://elsewhere.example/v1/files/abc", "https://api.replicate.com", None),
        ("https://api.replicate.com/v1/predictions/abc", "https://api.replicate.com", None),
        (FILES + "abc/download", "https://api.replicate.com", None),
        (FILES + "abc/", "https://api.replicate.com", "abc"),
        (FILES + "abc?x=1", "https://api.replicate.com", "abc"),
        (FILES + "../predictions", "https://api.replicate.com", None),
        (FILES + "a%2Fb", "https://api.replicate.com", None),
        (FILES, "https://api.replicate.com", None),
        ("https://proxy.example/v1/files/f1", "https://r8_tok@proxy.example", "f1"),
        ("https://proxy.example:notaport/v1/files/f1", "https://proxy.example", None),
        ("http://api.replicate.com/v1/files/abc", "https://api.replicate.com", None),
        (None, "https://api.replicate.com", None),
    ],
)
def test_file_id_of(url, base, expected):
    assert file_id_of(url, base) == expected


# --- against the emulator: what its list answers for inline and uploaded images --------------------


@pytest.fixture
def emulated_hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

    with FluxKontextEmulator(token="r8_OrphansTest_3f1c", prediction_seconds=30.0) as emulator:
        conn = {"conn_type": "fluxkontext", "host": emulator.base_url, "password": "r8_OrphansTest_3f1c"}
        monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
        yield FluxKontextHook()


@pytest.mark.parametrize("inline", [True, False], ids=["inline data: URI", "uploaded file"])
def test_the_emulators_list_shows_images_as_they_were_sent_and_they_match(emulated_hook, inline):
    image = LocalImage(png(), "image/png", "cat.png")
    other = LocalImage(png(colour=(10, 200, 10)), "image/png", "dog.png")
    inline_max = 1 << 20 if inline else 0
    since = datetime.now(timezone.utc)
    base = {"prompt": "Make it snowy", "input_image": "data:image/png;base64,"}
    for local in (other, image):  # the same prompt on two images: only the image tells them apart
        sent = wanted_for(MODEL, base, local, inline_max)
        if inline:
            model_input = dict(sent.input)
        else:
            model_input = {
                **sent.input,
                "input_image": emulated_hook.upload_file(local.data, content_type="image/png").urls.get,
            }
        created = emulated_hook.create_prediction(MODEL, model_input)
    log = mock.Mock()
    found = search_with_hook(emulated_hook, wanted_for(MODEL, base, image, inline_max), since, log)
    assert found is not None
    assert found.id == created.id
    assert "Adopting prediction" in log.info.call_args.args[0]


def test_an_ended_match_neither_is_adopted_nor_makes_ours_ambiguous():
    earlier = {**item("earlier"), "status": "failed"}  # e.g. this task's edit redone after it failed
    found = find_orphan(Pages([item("ours"), earlier]), Wanted(MODEL, INPUT), since=SINCE)
    assert found.prediction is not None
    assert found.prediction.id == "ours"
    alone = find_orphan(Pages([earlier]), Wanted(MODEL, INPUT), since=SINCE)
    assert alone.prediction is None
    assert "1 with it ended failed, canceled or aborted" in alone.reason


def _listing_hook(*, file_error: Exception | None = None, list_error: Exception | None = None) -> Any:
    hook = mock.Mock()
    hook.settings.base_url = "https://api.replicate.com"
    if list_error is not None:
        hook.list_predictions.side_effect = list_error
    else:
        hook.list_predictions.return_value = PredictionPage(
            results=[item("mine", input_image=FILES + "mine")], next=None
        )
    hook.get_file.side_effect = file_error
    return hook


def test_a_file_that_cannot_be_read_is_raised_so_the_retry_searches_again():
    from airflow_provider_kontext.exceptions import FluxKontextServerError

    wanted = Wanted(MODEL, {k: v for k, v in INPUT.items() if k != "input_image"}, "ab" * 32)
    hook = _listing_hook(file_error=FluxKontextServerError("Bad gateway", status=502))
    with pytest.raises(FluxKontextServerError):
        search_with_hook(hook, wanted, SINCE, mock.Mock())


def test_a_file_that_is_gone_is_no_match():
    from airflow_provider_kontext.exceptions import FluxKontextNotFoundError

    wanted = Wanted(MODEL, {k: v for k, v in INPUT.items() if k != "input_image"}, "ab" * 32)
    hook = _listing_hook(file_error=FluxKontextNotFoundError("File not found", status=404))
    assert search_with_hook(hook, wanted, SINCE, mock.Mock()) is None


def test_a_token_that_may_not_list_creates_and_says_what_it_may_cost():
    from airflow_provider_kontext.exceptions import FluxKontextAuthError

    log = mock.Mock()
    hook = _listing_hook(list_error=FluxKontextAuthError("Forbidden", status=403))
    assert search_with_hook(hook, Wanted(MODEL, INPUT), SINCE, log) is None
    assert "may not list predictions" in log.warning.call_args.args[0]
