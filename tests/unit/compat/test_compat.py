"""Test the compatibility module: names resolve per Airflow version, masking never blocks a loop.

The compatibility module: each name resolves to what the installed Airflow uses, and masking from
an event loop never takes the blocking path to the supervisor (on 3.1/3.2 that path either fails
inside the loop or re-enters it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from airflow_provider_kontext import compat


def test_exceptions_are_the_ones_the_task_runner_catches() -> None:
    """A ``AirflowFailException`` from another module would be retried like any other error."""
    import inspect

    from airflow.sdk.execution_time import task_runner

    source = inspect.getsource(task_runner)
    module = "airflow.sdk.exceptions" if compat.AIRFLOW_V_3_2_PLUS else "airflow.exceptions"
    assert compat.AirflowFailException.__module__ == module
    assert compat.TaskDeferred.__module__ == module
    assert f"from {module} import" in source


def test_version_flags_follow_the_installed_airflow() -> None:
    from airflow import __version__

    major, minor = (int(part) for part in __version__.split(".")[:2])
    assert compat.AIRFLOW_V_3_2_PLUS is ((major, minor) >= (3, 2))
    assert compat.AIRFLOW_V_3_3_PLUS is ((major, minor) >= (3, 3))
    assert compat.HAS_TASK_STATE_STORE is compat.AIRFLOW_V_3_3_PLUS


@pytest.mark.parametrize(
    ("version", "expected"), [("3.1.8", (3, 1)), ("3.3.0rc1", (3, 3)), ("3.10.0", (3, 10))]
)
def test_release_parsing(version: str, expected: tuple[int, int]) -> None:
    assert compat._release(version) == expected


class FakeComms:
    """The supervisor channel of a triggerer: ``send`` blocks (never allowed on the loop)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.blocking_sends = 0

    def send(self, msg: Any) -> None:
        self.blocking_sends += 1

    async def asend(self, msg: Any) -> None:
        await asyncio.sleep(0)
        self.sent.append(msg)


@pytest.fixture
def comms(monkeypatch: pytest.MonkeyPatch) -> FakeComms:
    from airflow.sdk.execution_time import task_runner

    fake = FakeComms()
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", fake, raising=False)
    return fake


@pytest.mark.parametrize(
    "amask", [compat.amask_secret, compat._amask_secret_before_3_3], ids=["installed", "before-3.3"]
)
def test_async_masking_reports_without_blocking_and_masks_locally(comms: FakeComms, amask: Any) -> None:
    from airflow.sdk._shared.secrets_masker import redact

    secret = "r8_compat_async_mask_5e1d"
    asyncio.run(amask(secret))
    assert comms.blocking_sends == 0
    assert [msg.value for msg in comms.sent] == [secret]
    assert secret not in str(redact(f"token={secret}"))


def test_async_masking_survives_a_broken_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk._shared.secrets_masker import redact
    from airflow.sdk.execution_time import task_runner

    class Broken:
        async def asend(self, msg: Any) -> None:
            raise ConnectionResetError("supervisor gone")

    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", Broken(), raising=False)
    secret = "r8_compat_broken_channel_9a2c"
    asyncio.run(compat._amask_secret_before_3_3(secret))
    assert secret not in str(redact(f"token={secret}"))


def test_sync_masking_masks_locally(comms: FakeComms) -> None:
    from airflow.sdk._shared.secrets_masker import redact

    secret = "r8_compat_sync_mask_41f0"
    compat.mask_secret(secret)
    assert secret not in str(redact(f"token={secret}"))
    assert comms.blocking_sends == 1  # the sync path is the blocking one: for sync code only


def test_hook_field_behaviour_uses_the_hook_spelling() -> None:
    declarative = {"hidden-fields": ["port"], "relabeling": {"host": "Base URL"}, "placeholders": {}}
    assert compat.hook_field_behaviour(declarative) == {
        "hidden_fields": ["port"],
        "relabeling": {"host": "Base URL"},
        "placeholders": {},
    }
