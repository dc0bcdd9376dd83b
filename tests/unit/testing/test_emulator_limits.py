"""Test the emulator's opt-in rate limits and its realistic timing.

The emulator's opt-in rate limits (Replicate's, low credit, explicit numbers) and its realistic
timing (per-prediction durations, seeded). Rate windows are moved with the emulator's clock, not
slept through, so these tests do not depend on how busy the machine is.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest
import requests
from emulated import data_uri, options, png, started
from openapi_contract import Contract

from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.emulator import main
from airflow_provider_kontext.testing.ratelimit import RateLimit, RateLimiter

pytest_plugins = ["pytester"]

DEV = "/v1/models/black-forest-labs/flux-kontext-dev/predictions"
THROTTLED = r"^Request was throttled\. Your rate limit resets in ~\d+s\.$"


BODY = {"input": {"prompt": "x", "input_image": data_uri(png((16, 16), (1, 2, 3)))}}


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[FluxKontextEmulator]:
    with started(request) as emulator:
        if emulator.config.rate_limit is not None:
            emulator.clock.freeze()  # count tokens exactly: only advance() refills
        yield emulator


@pytest.fixture
def http(emu: FluxKontextEmulator) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False
        session.hooks["response"].append(Contract(emu.base_url).requests_hook())
        yield session


def statuses(http: requests.Session, url: str, count: int, method: str = "GET") -> list[int]:
    return [
        http.request(method, url, json=BODY if method == "POST" else None).status_code for _ in range(count)
    ]


def assert_throttled(response: requests.Response) -> float:
    """Replicate's documented 429: that JSON body, no Retry-After. Returns the seconds it names."""
    assert response.status_code == 429
    assert "retry-after" not in {k.lower() for k in response.headers}
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail"}
    import re

    assert re.match(THROTTLED, body["detail"]), body
    return float(re.findall(r"~(\d+)s", body["detail"])[0])


def test_unlimited_by_default(emu: FluxKontextEmulator, http: requests.Session) -> None:
    assert set(statuses(http, f"{emu.base_url}/v1/account", 300)) == {200}
    assert set(statuses(http, f"{emu.base_url}{DEV}", 30, "POST")) == {201}
    assert emu.state()["config"]["rate_limit"] is None


@options(rate_limit="replicate")
def test_replicate_limits_others(emu: FluxKontextEmulator, http: requests.Session) -> None:
    """3000/min with a burst of 100: the 101st request at once is throttled, then 50 a second."""
    seen = statuses(http, f"{emu.base_url}/v1/account", 101)
    assert seen[:100] == [200] * 100
    response = http.get(f"{emu.base_url}/v1/account")
    assert assert_throttled(response) == 1
    emu.clock.advance(1.01)  # 50.5 more tokens
    assert statuses(http, f"{emu.base_url}/v1/account", 51) == [200] * 50 + [429]
    assert http.post(f"{emu.base_url}{DEV}", json=BODY).status_code == 201  # creates: their own budget
    assert emu.state()["config"]["rate_limit"] == "replicate"


@options(rate_limit="replicate")
def test_replicate_limits_creates(emu: FluxKontextEmulator, http: requests.Session) -> None:
    """600/min with a burst of 20; a throttled create creates nothing."""
    assert statuses(http, f"{emu.base_url}{DEV}", 21, "POST") == [201] * 20 + [429]
    assert emu.created_count == 20
    by_version = http.post(f"{emu.base_url}/v1/predictions", json={"version": "f" * 64, **BODY})
    assert_throttled(by_version)
    assert http.get(f"{emu.base_url}/v1/predictions").status_code == 200  # others still go
    emu.clock.advance(0.15)  # 10/s: one more create (and half of the next)
    assert statuses(http, f"{emu.base_url}{DEV}", 2, "POST") == [201, 429]


@options(rate_limit="low-credit")
def test_low_credit(emu: FluxKontextEmulator, http: requests.Session) -> None:
    """1 request a second and 6 a minute, creates and the rest together."""
    url = f"{emu.base_url}/v1/account"
    assert statuses(http, url, 2) == [200, 429]
    for _ in range(5):
        emu.clock.advance(1.05)
        assert http.post(f"{emu.base_url}{DEV}", json=BODY).status_code == 201
        assert_throttled(http.get(url))
    emu.clock.advance(1.05)  # one a second again, but six already this minute
    # the minute's bucket holds 6 - 6 + 6 * 0.105 = 0.63 of a request; a whole one is 3.7 s away
    assert assert_throttled(http.get(url)) == 4
    emu.clock.advance(3.8)
    assert http.get(url).status_code == 200
    assert emu.created_count == 5


@options(rate_limit="60,120,1")
def test_explicit_numbers_and_what_is_not_counted(emu: FluxKontextEmulator, http: requests.Session) -> None:
    """CREATES,OTHERS[,BURST_SECONDS] per minute; output files and control endpoints do not count."""
    assert statuses(http, f"{emu.base_url}{DEV}", 2, "POST") == [201, 429]
    assert statuses(http, f"{emu.base_url}/v1/account", 3) == [200, 200, 429]
    emu.clock.unfreeze()
    emu.clock.advance(1.0)
    (record,) = emu.predictions.values()
    prediction = http.get(f"{emu.base_url}/v1/predictions/{record.id}").json()
    assert prediction["status"] == "succeeded"
    for _ in range(5):
        assert http.get(prediction["output"]).status_code == 200
        assert http.get(f"{emu.base_url}/_emulator/state").status_code == 200
    assert emu.state()["responses"]["429"] == 2


def test_rate_limit_specs() -> None:
    replicate = RateLimit.parse("replicate")
    assert [(limit.per_minute, limit.burst) for limit in replicate.creates] == [(600, 20)]
    assert [(limit.per_minute, limit.burst) for limit in replicate.others] == [(3000, 100)]
    low = RateLimit.parse("low-credit")
    assert low.shared
    assert [(limit.per_minute, limit.burst) for limit in low.others] == [(60, 1), (6, 6)]
    assert RateLimit.parse(" 10, 20 ,3").others[0].burst == 1.0  # 20/min for 3 s is one
    for bad in ("fast", "10", "0,10", "10,20,0", "-1,5"):
        with pytest.raises(ValueError):
            RateLimit.parse(bad)
    with pytest.raises(ValueError):
        FluxKontextEmulator(rate_limit="fast")
    assert RateLimiter.detail(0.2) == "Request was throttled. Your rate limit resets in ~1s."
    assert RateLimiter.detail(29.5) == "Request was throttled. Your rate limit resets in ~30s."


def test_command_line_refuses_a_bad_rate_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--rate-limit", "fast", "--port", "0"])
    assert exited.value.code == 2
    assert "unknown rate limit" in capsys.readouterr().err


def test_fixture_option(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin"]')
    pytester.makepyfile(
        """
        import pytest
        import requests

        @pytest.mark.kontext_emulator(rate_limit="low-credit")
        def test_limited(kontext_emulator):
            with requests.Session() as http:
                http.trust_env = False
                url = kontext_emulator.base_url + "/v1/account"
                assert [http.get(url).status_code for _ in range(2)] == [200, 429]
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=1)


# --- realistic timing ---------------------------------------------------------------------------


def durations(emu: FluxKontextEmulator, http: requests.Session, count: int) -> list[tuple[float, float]]:
    ids = [http.post(f"{emu.base_url}{DEV}", json=BODY).json()["id"] for _ in range(count)]
    records = emu.predictions
    return [(records[i].timing.start_seconds, records[i].timing.prediction_seconds) for i in ids]


@options(start_seconds=0.6, prediction_seconds=4.0, spread=0.5, timing_seed=3)
def test_durations_vary_per_prediction_around_the_mean(
    emu: FluxKontextEmulator, http: requests.Session
) -> None:
    seen = durations(emu, http, 40)
    starts, runs = zip(*seen, strict=True)
    assert len(set(runs)) == 40
    assert all(0.3 <= s <= 0.9 for s in starts)
    assert all(2.0 <= r <= 6.0 for r in runs)
    assert statistics.mean(runs) == pytest.approx(4.0, rel=0.15)
    emu.reset()  # the same seed, the same durations, in creation order
    assert durations(emu, http, 40) == seen


def test_fixed_durations_by_default(emu: FluxKontextEmulator, http: requests.Session) -> None:
    assert set(durations(emu, http, 5)) == {(0.02, 0.1)}


@options(prediction_seconds=0.4, start_seconds=0.1, spread=0.5)
def test_a_varied_prediction_still_shows_its_phases(emu: FluxKontextEmulator, http: requests.Session) -> None:
    created = http.post(f"{emu.base_url}{DEV}", json=BODY).json()
    assert created["status"] == "starting"
    emu.clock.advance(5.0)
    final = http.get(created["urls"]["get"]).json()
    (record,) = emu.predictions.values()
    assert final["status"] == "succeeded"
    assert final["metrics"]["predict_time"] == pytest.approx(record.timing.prediction_seconds)
    lines = final["logs"].splitlines()
    assert lines[0].startswith("Using seed: ")
    assert len(lines) == 30  # the seed line, then tqdm's 0/28 .. 28/28


def test_command_line_timing_options() -> None:
    from airflow_provider_kontext.testing.cli import _parser, emulator_from_args

    def timing(*argv: str) -> tuple[float, float, float]:
        config = emulator_from_args(_parser().parse_args(list(argv))).config.timing
        return config.start_seconds, config.prediction_seconds, config.spread

    assert timing() == (0.3, 3.0, 0.0)  # the defaults stay fixed, as the existing suites expect
    assert timing("--realistic") == (0.6, 4.0, 0.5)
    assert timing("--realistic", "--prediction-seconds", "2", "--spread", "0") == (0.6, 2.0, 0.0)
    assert timing("--prediction-seconds", "1", "--spread", "0.2") == (0.3, 1.0, 0.2)
    limited = emulator_from_args(_parser().parse_args(["--rate-limit", "low-credit"]))
    assert limited.config.rate_limit == RateLimit.low_credit()
