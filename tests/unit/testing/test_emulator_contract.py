"""Test the emulator against Replicate's OpenAPI description and the behaviour it states in words.

The emulator against Replicate's OpenAPI description: every endpoint it serves, every response
validated (tests/openapi_contract.py, openapi-core), plus the behaviour the description states in
words: ``Prefer: wait`` that runs out answers ``starting``, the ``Cancel-After`` minimum and the
``deadline`` field, retention, the request schema, files, models, webhooks and the event stream.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from emulated import data_uri, options, png, started
from openapi_contract import Contract

from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.model_catalog import MODEL_VERSIONS

DEV_MODEL = "black-forest-labs/flux-kontext-dev"
DEV = f"/v1/models/{DEV_MODEL}/predictions"
TOKEN = "r8_contract"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


INPUT = {"prompt": "make it red", "input_image": data_uri(png((64, 48))), "seed": 7}


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[FluxKontextEmulator]:
    with started(request, token=TOKEN) as emulator:
        yield emulator


@pytest.fixture
def contract(emu: FluxKontextEmulator) -> Contract:
    return Contract(emu.base_url)


@pytest.fixture
def http(contract: Contract) -> Iterator[requests.Session]:
    """Return a session that sends the token and checks every response against the description."""
    with requests.Session() as session:
        session.trust_env = False
        session.headers.update(AUTH)
        session.hooks["response"].append(contract.requests_hook())
        yield session


def create(http: requests.Session, emu: FluxKontextEmulator, **kwargs: Any) -> requests.Response:
    body = {"input": INPUT, **kwargs.pop("body", {})}
    return http.post(f"{emu.base_url}{DEV}", json=body, **kwargs)


def wait_until_terminal(http: requests.Session, url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = http.get(url).json()
        if body["status"] in ("succeeded", "failed", "canceled", "aborted"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"not terminal after {timeout}s")


# --- the validator itself -----------------------------------------------------------------------


def test_the_contract_catches_departures(emu: FluxKontextEmulator, contract: Contract) -> None:
    """A body the description forbids fails the check (so the checks below can fail)."""
    good = requests.Session()
    good.trust_env = False
    body = good.get(f"{emu.base_url}/v1/account", headers=AUTH).content
    contract.check("GET", f"{emu.base_url}/v1/account", AUTH, None, 200, _json_headers(), body)
    bad_account = json.dumps({"type": "robot", "username": "x"}).encode()
    with pytest.raises(AssertionError, match="departs"):
        contract.check("GET", f"{emu.base_url}/v1/account", AUTH, None, 200, _json_headers(), bad_account)
    prediction = create(good, emu, headers=AUTH).json()
    url = f"{emu.base_url}/v1/predictions/{prediction['id']}"
    with pytest.raises(AssertionError, match="departs"):  # started_at is not nullable there
        contract.check(
            "GET",
            url,
            AUTH,
            None,
            200,
            _json_headers(),
            json.dumps({**prediction, "started_at": None}).encode(),
        )
    with pytest.raises(AssertionError):  # an undocumented error must be a problem document
        contract.check("GET", url, AUTH, None, 404, {"content-type": "text/html"}, b"<html></html>")


def _json_headers() -> dict[str, str]:
    return {"content-type": "application/json"}


# --- predictions --------------------------------------------------------------------------------


def test_create_get_cancel_list_validate(
    emu: FluxKontextEmulator, http: requests.Session, contract: Contract
) -> None:
    created = create(http, emu)
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "starting"
    assert body["source"] == "api"
    assert "started_at" not in body  # not nullable in the description: left out until known
    assert body["urls"]["stream"] == f"{emu.base_url}/v1/predictions/{body['id']}/stream"
    final = wait_until_terminal(http, body["urls"]["get"])
    assert final["status"] == "succeeded"
    assert {"started_at", "completed_at"} <= final.keys()
    assert http.post(final["urls"]["cancel"]).json()["status"] == "succeeded"
    by_version = http.post(
        f"{emu.base_url}/v1/predictions",
        json={"version": f"{DEV_MODEL}:{MODEL_VERSIONS[DEV_MODEL]}", "input": INPUT},
    )
    assert by_version.status_code == 201
    assert by_version.json()["version"] == MODEL_VERSIONS[DEV_MODEL]
    listed = http.get(f"{emu.base_url}/v1/predictions").json()
    assert [p["id"] for p in listed["results"]] == [by_version.json()["id"], body["id"]]
    assert all("logs" not in p for p in listed["results"])  # as Replicate's list: no logs
    assert {("POST", 201), ("GET", 200), ("POST", 200)} <= contract.operations()


@options(prediction_seconds=5.0)
def test_prefer_wait_that_runs_out_answers_starting(emu: FluxKontextEmulator, http: requests.Session) -> None:
    started = time.monotonic()
    body = create(http, emu, headers={"Prefer": "wait=1"}).json()
    assert time.monotonic() - started >= 0.9
    assert body["status"] == "starting"  # whatever it is doing, as Replicate answers
    assert body["output"] is None
    assert http.get(body["urls"]["get"]).json()["status"] == "processing"


def test_prefer_wait_that_finishes_answers_the_result(
    emu: FluxKontextEmulator, http: requests.Session
) -> None:
    body = create(http, emu, headers={"Prefer": "wait"}).json()
    assert body["status"] == "succeeded"
    assert body["output"].startswith(f"{emu.base_url}/files/")


def test_cancel_after_minimum_and_deadline(emu: FluxKontextEmulator, http: requests.Session) -> None:
    for too_short in ("4s", "4999ms", "1"):
        response = create(http, emu, headers={"Cancel-After": too_short})
        assert response.status_code == 400, too_short
        assert "minimum" in response.json()["detail"]
    body = create(http, emu, headers={"Cancel-After": "5s"}).json()
    assert "deadline" in body
    created = _time(body["created_at"])
    assert _time(body["deadline"]) - created == pytest.approx(5.0, abs=1e-3)
    assert "deadline" not in create(http, emu).json()
    assert emu.created_count == 2


@options(start_seconds=30.0)
def test_deadline_before_start_aborts(emu: FluxKontextEmulator, http: requests.Session) -> None:
    body = create(http, emu, headers={"Cancel-After": "5s"}).json()
    emu.clock.advance(5.1)
    final = http.get(body["urls"]["get"]).json()
    assert final["status"] == "aborted"
    assert final["completed_at"] == body["deadline"]


def test_retention_removes_input_output_and_logs(emu: FluxKontextEmulator, http: requests.Session) -> None:
    body = create(http, emu, headers={"Prefer": "wait"}).json()
    emu.clock.advance(3601)
    removed = http.get(body["urls"]["get"]).json()
    assert removed["data_removed"] is True
    assert (removed["input"], removed["output"], removed["logs"]) == ({}, None, "")
    listed = http.get(f"{emu.base_url}/v1/predictions").json()["results"][0]
    assert (listed["input"], listed["output"]) == ({}, None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": {}}, "inputs"),
        ({"webhook_url": "http://127.0.0.1/x"}, "webhook_url"),
        ({"webhook": "not a url"}, "webhook"),
        ({"webhook": "ftp://127.0.0.1/x"}, "webhook"),
        ({"webhook": 42}, "webhook"),
        ({"webhook": "http://127.0.0.1/x", "webhook_events_filter": ["finished"]}, "webhook_events_filter"),
        ({"webhook": "http://127.0.0.1/x", "webhook_events_filter": "completed"}, "webhook_events_filter"),
        ({"stream": "yes"}, "stream"),
        ({"version": "x"}, "version"),  # only the by-version create takes one
    ],
)
def test_request_schema_is_enforced(
    emu: FluxKontextEmulator, http: requests.Session, body: dict[str, Any], field: str
) -> None:
    response = create(http, emu, body=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["invalid_fields"][0]["field"] == field
    assert field in problem["detail"]
    assert emu.created_count == 0


def test_unknown_keys_on_the_version_create(emu: FluxKontextEmulator, http: requests.Session) -> None:
    response = http.post(
        f"{emu.base_url}/v1/predictions", json={"version": DEV_MODEL, "input": INPUT, "x": 1}
    )
    assert response.status_code == 422
    accepted = http.post(
        f"{emu.base_url}/v1/predictions", json={"version": DEV_MODEL, "input": INPUT, "stream": False}
    )
    assert accepted.status_code == 201


def test_list_pages_newest_first_with_created_after_and_cursors(
    emu: FluxKontextEmulator, http: requests.Session
) -> None:
    ids = [create(http, emu).json()["id"] for _ in range(5)]
    cut = http.get(f"{emu.base_url}/v1/predictions/{ids[2]}").json()["created_at"]
    # a page is 100: 205 more, through the by-version create
    more = [
        http.post(f"{emu.base_url}/v1/predictions", json={"version": DEV_MODEL, "input": INPUT}).json()["id"]
        for _ in range(205)
    ]
    everything = (ids + more)[::-1]  # newest first
    first = http.get(f"{emu.base_url}/v1/predictions").json()
    assert [p["id"] for p in first["results"]] == everything[:100]
    assert first["previous"] is None
    second = http.get(first["next"]).json()
    assert [p["id"] for p in second["results"]] == everything[100:200]
    third = http.get(second["next"]).json()
    assert [p["id"] for p in third["results"]] == everything[200:]
    assert third["next"] is None
    assert [p["id"] for p in http.get(third["previous"]).json()["results"]] == everything[100:200]
    assert [p["id"] for p in http.get(second["previous"]).json()["results"]] == everything[:100]

    after = http.get(f"{emu.base_url}/v1/predictions", params={"created_after": cut}).json()
    assert [p["id"] for p in after["results"]] == everything[:100]
    newest_old = http.get(f"{emu.base_url}/v1/predictions", params={"created_before": cut}).json()
    assert [p["id"] for p in newest_old["results"]] == ids[:2][::-1]
    window = http.get(
        f"{emu.base_url}/v1/predictions",
        params={"created_after": cut, "created_before": _iso_of(more[0], http, emu)},
    ).json()
    assert [p["id"] for p in window["results"]] == ids[2:][::-1]
    assert (
        http.get(f"{emu.base_url}/v1/predictions", params={"created_after": "yesterday"}).status_code == 400
    )
    assert http.get(f"{emu.base_url}/v1/predictions", params={"cursor": "!!"}).status_code == 400


def _iso_of(prediction_id: str, http: requests.Session, emu: FluxKontextEmulator) -> str:
    return str(http.get(f"{emu.base_url}/v1/predictions/{prediction_id}").json()["created_at"])


def _time(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- stream -------------------------------------------------------------------------------------


def parse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        name = next(line[len("event: ") :] for line in lines if line.startswith("event: "))
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        events.append((name, data))
    return events


def test_stream_sends_logs_output_and_done(emu: FluxKontextEmulator, http: requests.Session) -> None:
    body = create(http, emu).json()
    response = http.get(body["urls"]["stream"], headers={"Accept": "text/event-stream"}, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    assert events[0] == ("logs", "Using seed: 7")
    assert sum(1 for name, _ in events if name == "logs") == 30  # the seed and 29 progress lines
    final = http.get(body["urls"]["get"]).json()
    assert events[-2:] == [("output", final["output"]), ("done", "{}")]
    assert http.get(f"{emu.base_url}/v1/predictions/nope/stream").status_code == 404


def test_stream_of_a_failed_prediction(emu: FluxKontextEmulator, http: requests.Session) -> None:
    emu.faults.fail_predictions(1, error="CUDA out of memory")
    body = create(http, emu).json()
    events = parse_events(http.get(body["urls"]["stream"], timeout=30).text)
    assert events[-2:] == [("error", "CUDA out of memory"), ("done", json.dumps({"reason": "failed"}))]


# --- files --------------------------------------------------------------------------------------


def test_files_metadata_list_delete_and_download(
    emu: FluxKontextEmulator, http: requests.Session, contract: Contract
) -> None:
    content = b"\x89PNG not really"
    uploaded = http.post(
        f"{emu.base_url}/v1/files",
        files={"content": ("a.png", content, "image/png")},
        data={"metadata": json.dumps({"customer_reference_id": 123})},
    )
    assert uploaded.status_code == 201
    meta = uploaded.json()
    assert meta["metadata"] == {"customer_reference_id": 123}
    assert meta["checksums"]["sha256"] == hashlib.sha256(content).hexdigest()
    second = http.post(f"{emu.base_url}/v1/files", files={"content": ("b.txt", b"b", "text/plain")}).json()

    got = http.get(meta["urls"]["get"])
    assert got.headers["content-type"] == "application/json"
    assert got.json() == meta
    assert [f["id"] for f in http.get(f"{emu.base_url}/v1/files").json()["results"]] == [
        second["id"],
        meta["id"],
    ]

    bare = requests.Session()
    bare.trust_env = False
    for method, url in (
        ("GET", meta["urls"]["get"]),
        ("GET", f"{emu.base_url}/v1/files"),
        ("DELETE", meta["urls"]["get"]),
    ):
        assert bare.request(method, url).status_code == 401, (method, url)
    download = emu.file_download_url(meta["id"])
    assert bare.get(download).content == content  # signed: no token needed, as Replicate's
    assert bare.get(download.replace("signature=", "signature=x")).status_code == 404

    assert http.delete(meta["urls"]["get"]).status_code == 204
    assert http.get(meta["urls"]["get"]).status_code == 404
    assert http.delete(meta["urls"]["get"]).status_code == 404
    assert bare.get(download).status_code == 404
    assert [f["id"] for f in http.get(f"{emu.base_url}/v1/files").json()["results"]] == [second["id"]]
    assert {("POST", 201), ("GET", 200), ("DELETE", 204), ("GET", 404)} <= contract.operations()


def test_file_metadata_must_be_an_object(emu: FluxKontextEmulator, http: requests.Session) -> None:
    response = http.post(
        f"{emu.base_url}/v1/files", files={"content": ("a", b"a")}, data={"metadata": "[1, 2]"}
    )
    assert response.status_code == 422


# --- models -------------------------------------------------------------------------------------


def test_models_and_versions(emu: FluxKontextEmulator, http: requests.Session) -> None:
    model = http.get(f"{emu.base_url}/v1/models/{DEV_MODEL}").json()
    assert (model["owner"], model["name"]) == tuple(DEV_MODEL.split("/"))
    version = model["latest_version"]
    assert version["id"] == MODEL_VERSIONS[DEV_MODEL]
    assert "prompt" in version["openapi_schema"]["components"]["schemas"]["Input"]["properties"]
    listed = http.get(f"{emu.base_url}/v1/models/{DEV_MODEL}/versions").json()
    assert [v["id"] for v in listed["results"]] == [version["id"]]
    assert http.get(f"{emu.base_url}/v1/models/{DEV_MODEL}/versions/{version['id']}").json() == version
    assert http.get(f"{emu.base_url}/v1/models/{DEV_MODEL}/versions/{'0' * 64}").status_code == 404
    assert http.get(f"{emu.base_url}/v1/models/someone/else").status_code == 404


# --- webhooks -----------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what it gets and answers ``status``."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/replicate"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Verify a Standard Webhooks signature, written from the spec (not the emulator's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, candidate.split(",", 1)[1])
        for candidate in headers["webhook-signature"].split()
    )


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@options(prediction_seconds=1.2)
def test_webhooks_are_sent_for_the_requested_events_and_signed(
    emu: FluxKontextEmulator, http: requests.Session, contract: Contract
) -> None:
    secret = http.get(f"{emu.base_url}/v1/webhooks/default/secret").json()["key"]
    assert secret == emu.webhook_secret
    assert secret.startswith("whsec_")
    with Receiver() as receiver:
        body = create(
            http, emu, body={"webhook": receiver.url, "webhook_events_filter": ["start", "logs", "completed"]}
        ).json()
        wait_for(lambda: any(json.loads(b)["status"] == "succeeded" for _, b in receiver.received))
        time.sleep(0.2)  # nothing may follow the completed message
    messages = [(h, json.loads(b)) for h, b in receiver.received]
    assert all(verify(secret, h, b) for h, b in receiver.received)
    assert not verify("whsec_" + base64.b64encode(b"x" * 32).decode(), *receiver.received[0])
    assert messages[0][1]["status"] == "starting"
    assert messages[-1][1]["status"] == "succeeded"
    assert messages[-1][1]["output"] == http.get(body["urls"]["get"]).json()["output"]
    assert any(m["status"] == "processing" for _, m in messages)  # logs while running
    assert len(messages) < 10  # logs messages are throttled (Replicate: at most one per 500 ms)
    assert len({h["webhook-id"] for h, _ in messages}) == len(messages)
    for headers, message in messages:  # the body is the prediction as the API returns it
        contract.check(
            "GET",
            body["urls"]["get"],
            AUTH,
            None,
            200,
            {"content-type": "application/json"},
            json.dumps(message).encode(),
        )
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    events = [d.event for d in emu.webhook_deliveries]
    assert events[0] == "start"
    assert events[-1] == "completed"
    assert set(events[1:-1]) == {"logs"}
    assert all(d.delivered and d.status == 200 for d in emu.webhook_deliveries)


def test_webhook_default_events_are_output_and_completed(
    emu: FluxKontextEmulator, http: requests.Session
) -> None:
    with Receiver() as receiver:
        create(http, emu, body={"webhook": receiver.url})
        wait_for(lambda: len(emu.webhook_deliveries) >= 1)
        time.sleep(0.3)
    assert [d.event for d in emu.webhook_deliveries] == ["completed"]
    assert json.loads(receiver.received[0][1])["status"] == "succeeded"


def test_only_completed_for_a_failed_prediction_and_retries(
    emu: FluxKontextEmulator, http: requests.Session
) -> None:
    emu.faults.fail_predictions(1, nsfw=True)
    with Receiver(statuses=[503, 200]) as receiver:
        create(http, emu, body={"webhook": receiver.url, "webhook_events_filter": ["completed"]})
        wait_for(lambda: len(emu.webhook_deliveries) >= 1)
    (delivery,) = emu.webhook_deliveries
    assert (delivery.event, delivery.attempts, delivery.status, delivery.delivered) == (
        "completed",
        2,
        200,
        True,
    )
    assert len(receiver.received) == 2
    assert receiver.received[0][0]["webhook-id"] == receiver.received[1][0]["webhook-id"]  # the same message
    assert json.loads(receiver.received[1][1])["status"] == "failed"


def test_webhooks_to_other_hosts_are_not_sent(emu: FluxKontextEmulator, http: requests.Session) -> None:
    """The emulator is offline: a webhook that is not on a loopback address is recorded, not sent."""
    create(
        http,
        emu,
        body={"webhook": "https://hooks.example.com/replicate", "webhook_events_filter": ["completed"]},
    )
    wait_for(lambda: len(emu.webhook_deliveries) >= 1)
    (delivery,) = emu.webhook_deliveries
    assert delivery.delivered is False
    assert delivery.attempts == 0
    assert delivery.url == "https://hooks.example.com/replicate"
