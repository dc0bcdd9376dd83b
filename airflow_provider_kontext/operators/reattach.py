"""Find the prediction an earlier try of an edit started, so a retry waits for it instead of paying again.

Two ways, tried in order: the earlier try's record in the task state store
(:class:`~airflow_provider_kontext.edits.reattach.ReattachLedger`), then, for a create whose try died
before recording it, a search of the account's list (:mod:`airflow_provider_kontext.edits.orphans`).
On a first try both find nothing and the operator creates a new prediction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.edits.orphans import search_since, search_with_hook, wanted_for
from airflow_provider_kontext.edits.reattach import ReattachLedger, usable

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_kontext.edits.request import EditRequest
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.models import Prediction


def retry_ledger(context: Context, *, enabled: bool, log: Any) -> ReattachLedger:
    """Return where the task records its prediction for a retry (the task state store, Airflow >= 3.3)."""
    ledger = ReattachLedger.from_context(context, enabled=enabled)
    if enabled and not ledger.enabled:
        log.warning(
            "No task state store (Airflow < 3.3): a retry finds an earlier try's prediction "
            "only by searching the account's predictions"
        )
    return ledger


def earlier_prediction(
    context: Context,
    ledger: ReattachLedger,
    request: EditRequest,
    *,
    hook: FluxKontextHook,
    model: str,
    timeout: float,
    retries: int,
    inline_image_max_bytes: int,
    log: Any,
) -> tuple[Prediction, float] | None:
    """Return the prediction an earlier try started and its deadline, if a retry may take it over.

    Taken when it still runs or succeeded with its output; ``None`` otherwise (a new one is needed).

    :param timeout: how long a prediction may take (seconds), for deadlines not recorded.
    :param retries: the task's ``retries`` (without a state store, which try is the first).
    :raises FluxKontextError: the prediction or the account's list could not be read.
    """
    found = ledger.reattach(hook.get_prediction, request.fingerprint, timeout, log)
    if found is not None:
        return found
    since = search_since(ledger, context, request.fingerprint, retries, log)
    if since is None:
        return None
    wanted = wanted_for(model, request.model_input, request.image, inline_image_max_bytes)
    prediction = search_with_hook(hook, wanted, since, log)
    if prediction is None or not usable(prediction, "created by an earlier try", log):
        return None
    # As the lost try's deadline was: from the create (not from a search window's start).
    deadline = (prediction.created_at or since).timestamp() + timeout
    if prediction.id:
        ledger.record(prediction.id, request.fingerprint, deadline)
    return prediction, deadline
