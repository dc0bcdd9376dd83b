"""Build predictions as Replicate's API answers them, for the operator, sensor and trigger tests.

Predictions as Replicate's API answers them, for the tests of the operator, the sensor and the
trigger.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from airflow_provider_kontext.models import Prediction

DEV_MODEL = "black-forest-labs/flux-kontext-dev"


def api_prediction(prediction_id: str | None, status: str, **fields: Any) -> Prediction:
    """Return a prediction of the dev model in ``status``, created now, with Replicate's ``urls``.

    A prediction of the dev model in ``status``, created now, with Replicate's ``urls``;
    ``fields`` override or add to that.
    """
    data: dict[str, Any] = {
        "id": prediction_id,
        "model": DEV_MODEL,
        "status": status,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "urls": {
            "get": f"https://api.replicate.com/v1/predictions/{prediction_id}",
            "web": f"https://replicate.com/p/{prediction_id}",
        },
    }
    data.update(fields)
    return Prediction.model_validate(data)
