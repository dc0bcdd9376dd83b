"""Share the hook tests' constants and answers: the fake API's addresses, a token, an input."""

from __future__ import annotations

from typing import Any

TOKEN = "r8_TOPSECRET_abc123"
ENV_TOKEN = "r8_ENVTOKEN_xyz789"
API = "https://api.replicate.com"
PROXY = "https://proxy.example/replicate"
DEV = "black-forest-labs/flux-kontext-dev"
CREATE_URL = f"{API}/v1/models/{DEV}/predictions"
PRED_ID = "ufawqhfynnddngldkgtslldrkq"
GET_URL = f"{API}/v1/predictions/{PRED_ID}"
CANCEL_URL = f"{GET_URL}/cancel"
ACCOUNT_URL = f"{API}/v1/account"
FILES_URL = f"{API}/v1/files"
INPUT = {"prompt": "make it a watercolour", "input_image": "https://example.com/cat.png"}
PROBLEM = "application/problem+json"
THROTTLED = {"detail": "Request was throttled. Expected available in 1 second."}


def prediction_json(status: str = "starting", **fields: Any) -> dict[str, Any]:
    """Return a prediction as the API answers it, ``fields`` on top."""
    return {
        "id": PRED_ID,
        "model": DEV,
        "version": "hidden",
        "input": INPUT,
        "status": status,
        "output": None,
        "logs": "",
        "error": None,
        "urls": {"get": GET_URL, "cancel": CANCEL_URL, "web": f"https://replicate.com/p/{PRED_ID}"},
        **fields,
    }
