"""Test hostile and malformed input, property-based: a valid request or an error naming the field.

Hostile and malformed input, property-based: every operator argument and every model field, given
out-of-range, wrong-type, huge, unicode, empty and injection-shaped values, produces either a valid
request or a clear validation error naming the field; never an unhandled exception of another type,
never an HTTP call.

"Clear validation error" means: at construction a ``ValueError`` whose message names the argument;
at execution an ``AirflowFailException`` (so Airflow does not retry a bad input) whose message names
the argument or the field, raised before the hook is touched. "Valid request" means: the hook was
asked for exactly one create, whose input passes the model's schema again unchanged, serialises as
strict JSON, and builds a request whose path is one of the API's own.
"""

# A property test accepts either outcome, so it asserts on the exception it caught.
# ruff: noqa: PT017

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_kontext.compat import AirflowFailException, TaskDeferred
from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.hooks.api import create_prediction_request
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import (
    INPUT_MODELS,
    Prediction,
    check_model_reference,
    input_model_for,
    validate_input,
)
from airflow_provider_kontext.operators.kontext import MODEL_ARGUMENTS, FluxKontextEditOperator

DEV = "black-forest-labs/flux-kontext-dev"
PRO = "black-forest-labs/flux-kontext-pro"
IMAGE_URL = "https://example.com/cat.png"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
#: A path the API has: a create by model or by version.
API_PATH = re.compile(
    r"/v1/models/[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*/predictions|/v1/predictions"
)

# --- hostile values --------------------------------------------------------------------------------

INJECTIONS = [
    "",
    " ",
    "\t\n",
    "\x00",
    "nul\x00byte",
    "'; DROP TABLE task_instance; --",
    "{{ 7 * 7 }}",
    "{% raw %}",
    "${jndi:ldap://127.0.0.1/x}",
    "$(rm -rf /)",
    "../../../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:image/png;base64,@@not base64@@",
    "<script>alert(1)</script>",
    "https://example.com/a.png?x=1#frag",
    "https://user:pass@example.com/a.png",
    "http://[::1/broken",
    "https://",
    "black-forest-labs/flux-kontext-dev?x=1",
    "black-forest-labs/../../v1/account",
    "owner/name#fragment",
    "owner /name",
    "owner/name:ver/sion",
    "\u202eevil\u202c",
    "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48",
    "💥🔥",
    "\ud800",
    "NaN",
    "Infinity",
    "-1",
    "1e309",
    "0x10",
    " 28 ",
    "28.0",
    "true",
    "None",
    "a" * 100_000,
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.just(10**400),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-300, 1e300]),
    st.text(max_size=30),
    st.sampled_from(INJECTIONS),
    st.binary(max_size=40),
)
HOSTILE = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), SCALARS, max_size=3),
    st.sampled_from([object(), datetime(2025, 1, 1), timedelta(seconds=5), timedelta(days=-1), {1, 2}]),
    st.sampled_from([bytearray(b"\xff"), PNG, b"%PDF-1.4", frozenset({"a"}), (1, 2)]),
)

#: Every constructor argument a user sets (``task_id`` aside), and the model inputs among them.
OPERATOR_ARGUMENTS = (
    "prompt",
    "input_image",
    *MODEL_ARGUMENTS[1:],
    "extra_input",
    "model",
    "flux_kontext_conn_id",
    "deferrable",
    "poll_interval",
    "wait_seconds",
    "timeout",
    "reattach_on_retry",
    "retry_uncertain_create",
    "cancel_on_kill",
    "output_path",
    "max_output_bytes",
    "inline_image_max_bytes",
)


# --- helpers ---------------------------------------------------------------------------------------


def fresh_hook() -> mock.Mock:
    fake = mock.create_autospec(FluxKontextHook, instance=True)
    fake.create_prediction.return_value = Prediction.model_validate(
        {"id": "p1", "status": "starting", "created_at": datetime.now().astimezone().isoformat()}
    )
    fake.get_prediction.return_value = Prediction.model_validate(
        {"id": "p1", "status": "succeeded", "output": "https://example.com/out.png"}
    )  # polled in the worker when deferrable is false
    fake.upload_file.side_effect = AssertionError("no upload expected")
    fake.redact.side_effect = lambda text: text  # not an HTTP call
    return fake


def assert_valid_request(op: FluxKontextEditOperator, hook: mock.Mock) -> None:
    """Check that the create the operator asked for is a well-formed request to one of the API's paths."""
    calls = [c[0] for c in hook.method_calls]
    assert calls[0] == "create_prediction"
    assert set(calls) <= {"create_prediction", "get_prediction", "redact"}, calls
    hook.create_prediction.assert_called_once()
    call = hook.create_prediction.call_args
    model, body = call.args
    assert body == validate_input(model, body)  # the schema accepts it again, unchanged
    json.dumps(body, allow_nan=False)
    request = create_prediction_request(
        model, body, wait=call.kwargs.get("wait"), cancel_after=call.kwargs.get("cancel_after")
    )
    assert API_PATH.fullmatch(request.path), request.path
    json.dumps(request.json, allow_nan=False)


def names(message: str, argument: str, value: Any) -> bool:
    """Whether an error message names the argument (or, for ``extra_input``, one of its keys)."""
    if argument in message:
        return True
    if argument == "extra_input" and isinstance(value, dict):
        return any(f"{key}:" in message or f"{key!r}" in message for key in value)
    return False


def run(argument: str, value: Any) -> str:
    """Build and execute an operator with ``argument=value``; return what happened (and check it)."""
    kwargs: dict[str, Any] = {"task_id": "edit", "prompt": "Make it blue", "input_image": IMAGE_URL}
    kwargs[argument] = value
    try:
        op = FluxKontextEditOperator(**kwargs)
    except ValueError as exc:
        assert argument in str(exc), (argument, str(exc))
        return "rejected at construction"
    op._cached_logger = mock.Mock(name="log")
    hook = fresh_hook()
    context = {"ti": mock.MagicMock(name="ti"), "task_state_store": None}
    with mock.patch.object(FluxKontextEditOperator, "hook", hook):
        try:
            op.execute(context)  # type: ignore[arg-type]
        except AirflowFailException as exc:
            assert isinstance(exc.__cause__, FluxKontextInputError)
            assert names(str(exc), argument, value), (argument, str(exc)[:300])
            assert hook.method_calls == [], "an invalid input reached the hook"
            return "rejected before any call"
        except TaskDeferred as deferred:
            json.dumps(deferred.trigger.serialize()[1], allow_nan=False)
    assert_valid_request(op, hook)
    return "valid request"


# --- the operator ----------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None, database=None)
@given(argument=st.sampled_from(OPERATOR_ARGUMENTS), value=HOSTILE)
def test_every_operator_argument_gives_a_valid_request_or_a_clear_error(argument: str, value: Any) -> None:
    run(argument, value)


@settings(max_examples=150, deadline=None, database=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["seed", "prompt", "safety_tolerance"]), HOSTILE, max_size=4
    )
)
def test_extra_input_for_an_unknown_model(extra: dict[str, Any]) -> None:
    """A model without a schema passes extra inputs through: they still have to be JSON."""
    kwargs = {"task_id": "edit", "prompt": "p", "input_image": IMAGE_URL, "model": "someone/kontext-fork"}
    try:
        op = FluxKontextEditOperator(**kwargs, extra_input=extra)
    except FluxKontextInputError as exc:  # a literal the schema refuses: a DAG import error
        assert names(str(exc), "extra_input", extra), str(exc)[:300]
        return
    op._cached_logger = mock.Mock()
    hook = fresh_hook()
    with mock.patch.object(FluxKontextEditOperator, "hook", hook):
        try:
            op.execute({"ti": mock.MagicMock(), "task_state_store": None})  # type: ignore[arg-type]
        except AirflowFailException as exc:
            assert hook.method_calls == []
            assert names(str(exc), "extra_input", extra) or "prompt" in str(exc) or "input_image" in str(exc)
            return
        except TaskDeferred:
            pass
    assert_valid_request(op, hook)


@pytest.mark.parametrize(
    ("argument", "value", "outcome"),
    [
        ("model", "black-forest-labs/flux-kontext-dev?x=1", "rejected at construction"),
        ("model", "black-forest-labs/../../v1/account", "rejected at construction"),
        ("model", "owner/name#frag", "rejected at construction"),
        ("model", 42, "rejected at construction"),
        ("input_image", "nul\x00byte", "rejected before any call"),
        ("input_image", "data:image/png;base64,@@", "rejected at construction"),
        ("input_image", "https://", "rejected at construction"),
        ("output_path", "nul\x00byte", "rejected before any call"),
        ("output_path", "nosuchscheme://bucket/x", "rejected before any call"),
        ("extra_input", {"z": object()}, "rejected before any call"),
        ("poll_interval", "soon", "rejected at construction"),
        ("poll_interval", math.inf, "rejected at construction"),
        ("poll_interval", 1e300, "rejected at construction"),
        ("timeout", math.nan, "rejected at construction"),
        ("timeout", timedelta(days=10_000), "rejected at construction"),
        ("wait_seconds", 1.5, "rejected at construction"),
        ("wait_seconds", "abc", "rejected at construction"),
        ("max_output_bytes", math.inf, "rejected at construction"),
        ("inline_image_max_bytes", -1, "rejected at construction"),
        ("inline_image_max_bytes", "big", "rejected at construction"),
        ("flux_kontext_conn_id", "", "rejected at construction"),
        ("flux_kontext_conn_id", None, "rejected at construction"),
        ("num_inference_steps", "28", "valid request"),
        ("prompt", "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 💥 \u202e", "valid request"),
        ("timeout", timedelta(minutes=5), "valid request"),
    ],
)
def test_examples_found_and_fixed(argument: str, value: Any, outcome: str) -> None:
    """Check the inputs that once failed badly: each now fails early, naming its argument.

    Each of these once ended in an unhandled error, a message that did not name the argument,
    an HTTP call with a retargeted URL, or a failure only after the edit had been paid for.
    """
    assert run(argument, value) == outcome


def test_an_upload_happens_only_for_a_valid_local_image(tmp_path: Any) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    for bad in ({"aspect_ratio": "2:1"}, {"model": "a/b?c"}, {"output_path": "nosuchscheme://x"}):
        op = FluxKontextEditOperator(
            task_id="edit", prompt="p", input_image=str(image), inline_image_max_bytes=0
        )
        for name, value in bad.items():  # as a template may render it (literals fail when parsed)
            setattr(op, name, value)
        op._cached_logger = mock.Mock()
        hook = fresh_hook()
        with mock.patch.object(FluxKontextEditOperator, "hook", hook), pytest.raises(AirflowFailException):
            op.execute({"ti": mock.MagicMock(), "task_state_store": None})  # type: ignore[arg-type]
        assert hook.method_calls == [], bad


# --- the models ------------------------------------------------------------------------------------

FIELDS = sorted({name for schema in INPUT_MODELS.values() for name in schema.model_fields})


@settings(max_examples=800, deadline=None, database=None)
@given(
    model=st.sampled_from([*INPUT_MODELS, "someone/kontext-fork", f"{DEV}:{'a' * 64}"]),
    values=st.dictionaries(
        st.sampled_from(FIELDS) | st.text(max_size=8) | st.integers(), HOSTILE, max_size=6
    ),
)
def test_every_model_field_validates_or_names_the_field(model: str, values: dict[Any, Any]) -> None:
    try:
        body = validate_input(model, values)
    except FluxKontextInputError as exc:
        assert exc.errors, str(exc)
        keys = {str(key) for key in values}
        for field, message in exc.errors:
            assert message
            assert f"{field}: " in str(exc)
            # a field named in the error is one that was given, or a required one that was missing,
            # or the whole input (a rule across fields)
            assert field in keys or field.split(".")[0] in keys | {"prompt", "input_image", "input"}
        return
    json.dumps(body, allow_nan=False)
    assert set(body) <= {str(key) for key in values}
    assert validate_input(model, body) == body
    schema = input_model_for(model)
    if schema.model_config.get("extra") == "forbid":
        assert set(body) <= set(schema.model_fields)


@settings(max_examples=300, deadline=None, database=None)
@given(model=HOSTILE | st.text(alphabet="abc/:.-_?#% \x00", max_size=20))
def test_a_model_reference_is_checked_before_it_reaches_a_url(model: Any) -> None:
    try:
        checked = check_model_reference(model)
    except FluxKontextInputError as exc:
        assert str(exc).startswith("model: ")
        with pytest.raises(ValueError, match="model must be"):
            create_prediction_request(model, {"prompt": "p"})
        return
    assert API_PATH.fullmatch(create_prediction_request(checked, {"prompt": "p"}).path)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 10.5])
def test_guidance_out_of_range_names_the_field(value: float) -> None:
    with pytest.raises(FluxKontextInputError, match=r"^Invalid input for .*: guidance: ") as info:
        validate_input(DEV, {"prompt": "p", "input_image": IMAGE_URL, "guidance": value})
    assert [field for field, _ in info.value.errors] == ["guidance"]


def test_huge_values_are_shown_shortened_in_the_message() -> None:
    with pytest.raises(FluxKontextInputError) as info:
        validate_input(DEV, {"prompt": "p" * 20_000, "input_image": IMAGE_URL, "seed": 10**400})
    assert len(str(info.value)) < 1000
    assert {field for field, _ in info.value.errors} == {"prompt", "seed"}


def test_pro_schema_applies_its_own_bounds() -> None:
    with pytest.raises(FluxKontextInputError, match="safety_tolerance"):
        validate_input(PRO, {"prompt": "p", "input_image": IMAGE_URL, "safety_tolerance": 6})
