"""Check the arguments the provider's tasks share, when the DAG file is parsed.

The single and the batch edit operator take the same model inputs, connection, hook settings and
wait settings; the sensor takes the connection part. The mixins here check each once, the same way
for all (a bad value raises ``ValueError`` naming the argument, a DAG import error), and derive
what the tasks need from them: the hook, the model arguments, the wait's timeout and its backstop.
"""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.edits.deadlines import wait_timeout
from airflow_provider_kontext.hooks.connection import checked_overrides
from airflow_provider_kontext.models.arguments import check_number, default_deferrable

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

#: The model inputs both operators take as arguments besides ``prompt`` (others: ``extra_input``).
MODEL_INPUTS = (
    "aspect_ratio",
    "num_inference_steps",
    "guidance",
    "seed",
    "output_format",
    "output_quality",
    "disable_safety_checker",
    "go_fast",
)
#: The longest ``timeout`` and ``poll_interval`` accepted (a week): beyond any prediction's life, and
#: far inside what ``timedelta`` and the trigger's deadline arithmetic can hold.
MAX_WAIT = timedelta(days=7)


class ConnectionArguments:
    """Hold the connection a task uses, its hook settings and whether it defers; make its hook."""

    flux_kontext_conn_id: str
    hook_params: dict[str, Any]
    deferrable: bool

    def _take_connection(
        self, flux_kontext_conn_id: str, hook_params: dict[str, Any] | None, deferrable: bool | None
    ) -> None:
        """Check and keep the connection arguments.

        :raises ValueError: an empty connection id, or a hook setting that is unknown or out of range.
        """
        if not isinstance(flux_kontext_conn_id, str) or not flux_kontext_conn_id:
            raise ValueError(f"flux_kontext_conn_id must be a non-empty string, got {flux_kontext_conn_id!r}")
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self.hook_params = checked_overrides(hook_params or {})
        self.deferrable = default_deferrable() if deferrable is None else deferrable

    @cached_property
    def hook(self) -> FluxKontextHook:
        """Return the hook for the task's connection (imported when first used, not at DAG parse)."""
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook

        return FluxKontextHook(self.flux_kontext_conn_id, **self.hook_params)


class EditArguments(ConnectionArguments):
    """Hold and check what an edit operator is given: model inputs, how to wait, where outputs go."""

    execution_timeout: timedelta | None
    model: str
    extra_input: dict[str, Any] | None
    aspect_ratio: str | None
    num_inference_steps: int | str | None
    guidance: float | str | None
    seed: int | str | None
    output_format: str | None
    output_quality: int | str | None
    disable_safety_checker: bool | str | None
    go_fast: bool | str | None
    poll_interval: float
    min_defer_seconds: float | None
    timeout: float | timedelta | None
    output_path: Any
    max_output_bytes: int
    inline_image_max_bytes: int

    def _take_edit_arguments(
        self,
        *,
        aspect_ratio: str | None,
        num_inference_steps: int | str | None,
        guidance: float | str | None,
        seed: int | str | None,
        output_format: str | None,
        output_quality: int | str | None,
        disable_safety_checker: bool | str | None,
        go_fast: bool | str | None,
        extra_input: dict[str, Any] | None,
        model: str,
        flux_kontext_conn_id: str,
        hook_params: dict[str, Any] | None,
        deferrable: bool | None,
        poll_interval: float,
        min_defer_seconds: float | None,
        timeout: float | timedelta | None,
        output_path: Any,
        max_output_bytes: int,
        inline_image_max_bytes: int,
    ) -> None:
        """Keep the model inputs and the connection; check the wait and output settings.

        Model inputs are kept as given (templates render later); see ``check_literal_inputs`` for
        the parse-time check of literal ones.

        :raises ValueError: naming the argument and its allowed range.
        """
        self.aspect_ratio = aspect_ratio
        self.num_inference_steps = num_inference_steps
        self.guidance = guidance
        self.seed = seed
        self.output_format = output_format
        self.output_quality = output_quality
        self.disable_safety_checker = disable_safety_checker
        self.go_fast = go_fast
        self.extra_input = extra_input
        self.model = model
        self._take_connection(flux_kontext_conn_id, hook_params, deferrable)
        self.poll_interval = check_number("poll_interval", poll_interval, maximum=MAX_WAIT.total_seconds())
        self.min_defer_seconds = (
            None
            if min_defer_seconds is None
            else check_number("min_defer_seconds", min_defer_seconds, 0, 600)
        )
        if timeout is not None:
            seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
            check_number("timeout", seconds, maximum=MAX_WAIT.total_seconds())
        self.timeout = timeout
        self.output_path = output_path
        self.max_output_bytes = int(check_number("max_output_bytes", max_output_bytes, 1, integer=True))
        self.inline_image_max_bytes = int(
            check_number("inline_image_max_bytes", inline_image_max_bytes, 0, integer=True)
        )

    def _model_arguments(self) -> dict[str, Any]:
        """Return the model inputs given as arguments, by name (``None`` where not given)."""
        return {name: getattr(self, name) for name in MODEL_INPUTS}

    def _timeout_seconds(self) -> float:
        """Return how long a prediction may take: ``timeout``, else from ``execution_timeout``."""
        return wait_timeout(self.timeout, self.execution_timeout)

    def _resume_floor(self) -> float:
        """Return the least time a deferral lasts: ``min_defer_seconds``, else the triggers' default."""
        if self.min_defer_seconds is not None:
            return self.min_defer_seconds
        from airflow_provider_kontext.triggers.kontext import default_min_defer_seconds

        return default_min_defer_seconds()

    def _defer_backstop(self, end_time: float) -> timedelta:
        """Return Airflow's timeout for a deferral ending at ``end_time``: a backstop only.

        The trigger's own deadline fires first (and cancels remotely); this one ends a deferral whose
        trigger was lost.
        """
        return timedelta(seconds=max(0.0, end_time - time.time()) + 10 * self.poll_interval + 60)
