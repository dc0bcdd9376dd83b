"""Link a task to its prediction's page on Replicate (or the proxy's equivalent): an extra link."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: The XCom key under which the operator pushes the prediction's web URL right after creating it.
WEB_URL_XCOM_KEY = "prediction_web_url"


class FluxKontextPredictionLink(BaseOperatorLink):
    """Link to the web page of the prediction the task started ("Replicate prediction"; empty before)."""

    name = "Replicate prediction"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """Return the prediction's web URL the task pushed, or ``""`` while there is none.

        Airflow asks at the end of each task start, in the worker, with the task that just ran: what
        that start learnt is on it (``prediction_web_url``), which saves a request to the API
        server; otherwise it is read from the XCom an earlier start pushed.
        """
        url = getattr(operator, "prediction_web_url", None)
        if not isinstance(url, str):
            url = XCom.get_value(ti_key=ti_key, key=WEB_URL_XCOM_KEY)
        return url if isinstance(url, str) and url.startswith(("https://", "http://")) else ""


#: The name of releases before 0.2 (one class prefix since).
ReplicatePredictionLink = FluxKontextPredictionLink
