"""Test downloads of outputs into ``output_path`` with the real hook against a scripted server.

Downloads of outputs into ``output_path``, with the real hook against a scripted server on 127.0.0.1:
a size cap (also against a body that never ends), a content-type check (the declared type and the
bytes), no path traversal from names the server chooses, and never a partial file left behind as if
it were complete (it is written under a temporary name and renamed once whole).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextError,
    FluxKontextPredictionFailed,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

from .test_server import ScriptedServer, endless, reset_connection, response

CONN_ID = "kontext_downloads"
PID = "dl0prediction0id"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64)
#: ``<input>-<prediction id>``, each part cut to 100 safe characters (or ``edit-<ms>``), then the type's
#: extension (no index: one output).
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,201}\.(?:png|jpg|gif|webp)")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        conn = {
            "conn_type": "fluxkontext",
            "host": srv.base_url,
            "password": "r8_download_token",
            "extra": {"max_retries": 1, "timeout": 2, "connect_timeout": 2, "backoff_max": 0},
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
        monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: None)
        yield srv


def finish(folder: Path, outputs: list[str], prediction_id: str | None = PID, **kwargs: Any) -> list[str]:
    """Complete a succeeded prediction with these outputs into ``folder``, with the real hook."""
    op = FluxKontextEditOperator(
        task_id="edit",
        prompt="p",
        input_image="https://example.com/in.png",
        flux_kontext_conn_id=CONN_ID,
        output_path=str(folder),
        **kwargs,
    )
    op._cached_logger = mock.Mock()
    prediction = Prediction.model_validate({"id": prediction_id, "status": "succeeded", "output": outputs})
    return op.execute_complete({"ti": mock.MagicMock()}, prediction_event(prediction))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# --- size cap --------------------------------------------------------------------------------------


def test_a_body_over_the_cap_is_refused_and_nothing_is_kept(server: ScriptedServer, tmp_path: Path) -> None:
    server.script(response(200, PNG + bytes(300_000), "image/png"))
    with pytest.raises(FluxKontextAPIError, match="output too large"):
        finish(tmp_path / "out", [f"{server.base_url}/out.png"], max_output_bytes=100_000)
    assert files_in(tmp_path / "out") == []
    assert len(server.seen) == 1  # too large is final: not downloaded again


def test_a_body_that_never_ends_is_cut_at_the_cap(server: ScriptedServer, tmp_path: Path) -> None:
    server.script(endless("image/png"))
    started = time.monotonic()
    with pytest.raises(FluxKontextAPIError, match="output too large"):
        finish(tmp_path / "out", [f"{server.base_url}/out.png"], max_output_bytes=1 << 20)
    assert time.monotonic() - started < 10
    assert files_in(tmp_path / "out") == []


def test_a_data_uri_over_the_cap_is_refused(tmp_path: Path) -> None:
    import base64

    uri = "data:image/png;base64," + base64.b64encode(PNG + bytes(10_000)).decode()
    with pytest.raises(FluxKontextPredictionFailed, match="more than 1000 bytes"):
        finish(tmp_path / "out", [uri], max_output_bytes=1000)
    assert files_in(tmp_path / "out") == []


def test_a_body_at_the_cap_is_kept(server: ScriptedServer, tmp_path: Path) -> None:
    server.script(response(200, PNG, "image/png"))
    (saved,) = finish(tmp_path / "out", [f"{server.base_url}/out.png"], max_output_bytes=len(PNG))
    assert Path(saved.removeprefix("file://")).read_bytes() == PNG


# --- content type ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"<html><title>Access denied</title></html>", "image/png", "not a jpeg/png/gif/webp image"),
        (b"%PDF-1.4 ...", "application/octet-stream", "not a jpeg/png/gif/webp image"),
        (PNG, "text/html", "served as 'text/html', not as an image"),
        (PNG, "application/json; charset=utf-8", "not as an image"),
        (b"", "image/png", "not a jpeg/png/gif/webp image"),
    ],
)
def test_what_is_not_an_image_is_refused(
    server: ScriptedServer, tmp_path: Path, body: bytes, content_type: str, expected: str
) -> None:
    server.script(response(200, body, content_type))
    with pytest.raises(FluxKontextPredictionFailed, match=re.escape(expected)):
        finish(tmp_path / "out", [f"{server.base_url}/out.png"])
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("body", "content_type", "suffix"),
    [
        (PNG, "image/png", ".png"),
        (PNG, "image/webp", ".png"),  # the bytes decide the extension, not the server's claim
        (JPEG, "application/octet-stream", ".jpg"),
        (JPEG, None, ".jpg"),
    ],
)
def test_images_are_kept_under_the_extension_their_bytes_say(
    server: ScriptedServer, tmp_path: Path, body: bytes, content_type: str | None, suffix: str
) -> None:
    server.script(response(200, body, content_type))
    (saved,) = finish(tmp_path / "out", [f"{server.base_url}/evil.exe"])
    assert saved.endswith(f"/in-{PID}{suffix}")
    assert Path(saved.removeprefix("file://")).read_bytes() == body


# --- names the server chooses ----------------------------------------------------------------------


@settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prediction_id=st.one_of(
        st.text(max_size=300),
        st.sampled_from(
            [
                "../../../../tmp/escaped",
                "..",
                ".",
                "/etc/passwd",
                "..\\..\\windows",
                "a/../../b",
                "~root",
                "$(id)",
                "a" * 10_000,
                "\x00",
                "CON",
                "🙂" * 50,
            ]
        ),
        st.none(),
    ),
    url_name=st.sampled_from(["out.png", "../../../escape.png", "..%2F..%2Fescape.png", "x/../../y.png"]),
)
def test_server_chosen_names_never_leave_the_folder(
    server: ScriptedServer, tmp_path_factory: pytest.TempPathFactory, prediction_id: str | None, url_name: str
) -> None:
    root = tmp_path_factory.mktemp("dl")
    folder = root / "a" / "out"
    server.script(response(200, PNG, "image/png"))
    (saved,) = finish(folder, [f"{server.base_url}/files/{url_name}"], prediction_id=prediction_id)
    written = [p for p in root.rglob("*") if p.is_file()]
    assert [p.parent for p in written] == [folder]
    assert SAFE_NAME.fullmatch(written[0].name), written[0].name
    assert saved == written[0].as_uri()


# --- never a partial file as if complete -----------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        response(200, PNG, "image/png", length=10_000),  # the body ends early
        reset_connection(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n" + PNG
        ),
    ],
    ids=["cut-short", "reset-mid-body"],
)
def test_a_cut_download_leaves_no_file(server: ScriptedServer, tmp_path: Path, answer: Any) -> None:
    server.script(answer)
    with pytest.raises(FluxKontextError):
        finish(tmp_path / "out", [f"{server.base_url}/out.png"])
    assert files_in(tmp_path / "out") == []
    assert len(server.seen) == 2  # retried once (a read), then given up


def test_an_interrupted_write_removes_the_partial_file(
    server: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a ``KeyboardInterrupt`` (a task being killed) in the middle of writing."""
    from airflow.sdk import ObjectStoragePath

    server.script(response(200, PNG + bytes(3 << 20), "image/png"))
    real_open = ObjectStoragePath.open
    writes: list[int] = []

    class Interrupted:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Interrupted:
            return self

        def __exit__(self, *exc_info: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            writes.append(len(data))
            if len(writes) == 2:
                raise KeyboardInterrupt
            return int(self.f.write(data))

    def open_(self: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(self, mode, *args, **kwargs)
        return Interrupted(f) if self.name.endswith(".partial") else f

    monkeypatch.setattr(ObjectStoragePath, "open", open_)
    with pytest.raises(KeyboardInterrupt):
        finish(tmp_path / "out", [f"{server.base_url}/out.png"], max_output_bytes=10 << 20)
    assert writes, "the interruption did not happen while writing the partial file"
    assert files_in(tmp_path / "out") == []


def test_a_killed_worker_leaves_only_a_marked_partial_file(server: ScriptedServer, tmp_path: Path) -> None:
    """Check that a worker killed mid-write leaves a hidden ``.partial`` file, never the final name.

    A worker killed mid-write (no cleanup runs) leaves a hidden ``.partial`` file, never a file
    under the final name that a reader could take for a complete image.
    """
    folder = tmp_path / "out"
    server.script(response(200, PNG + bytes(3 << 20), "image/png"))
    connection = json.dumps({"conn_type": "fluxkontext", "host": server.base_url})
    script = textwrap.dedent(
        f"""
        import io, os, json
        from unittest import mock
        os.environ["AIRFLOW_CONN_{CONN_ID.upper()}"] = {connection!r}
        from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
        from airflow_provider_kontext.models import Prediction
        from airflow_provider_kontext.edits.events import prediction_event
        from airflow.sdk import ObjectStoragePath
        real_open = ObjectStoragePath.open
        class Killed:
            def __init__(self, f):
                self.f, self.n = f, 0
            def __enter__(self):
                return self
            def __exit__(self, *exc_info):
                self.f.close()
            def write(self, data):
                self.n += 1
                if self.n == 2:
                    self.f.flush()
                    os._exit(9)  # killed: no finally, no except, no cleanup
                return self.f.write(data)
        def open_(self, mode="r", *args, **kwargs):
            f = real_open(self, mode, *args, **kwargs)
            return Killed(f) if self.name.endswith(".partial") else f
        ObjectStoragePath.open = open_
        op = FluxKontextEditOperator(task_id="t", prompt="p", input_image="https://x.example/a.png",
            flux_kontext_conn_id="{CONN_ID}", output_path={str(folder)!r}, max_output_bytes=10 << 20)
        op._cached_logger = mock.Mock()
        event = prediction_event(Prediction.model_validate(
            {{"id": "{PID}", "status": "succeeded", "output": "{server.base_url}/out.png"}}))
        op.execute_complete({{"ti": mock.MagicMock()}}, event)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert files_in(folder) == [f".a-{PID}.png.partial"]


def test_a_second_try_replaces_a_leftover_partial_and_completes(
    server: ScriptedServer, tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / f".in-{PID}.png.partial").write_bytes(b"half")
    server.script(response(200, PNG, "image/png"))
    finish(folder, [f"{server.base_url}/out.png"])
    assert files_in(folder) == [f"in-{PID}.png"]
    assert (folder / f"in-{PID}.png").read_bytes() == PNG
