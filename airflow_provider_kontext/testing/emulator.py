"""An offline emulator of Replicate's predictions API for FLUX.1 Kontext, served over real HTTP.

:class:`FluxKontextEmulator` runs a FastAPI app under uvicorn in a background thread on 127.0.0.1::

    with FluxKontextEmulator(prediction_seconds=0.2, output_scale=0.1) as emu:
        requests.post(f"{emu.base_url}/v1/models/black-forest-labs/flux-kontext-dev/predictions", ...)
        emu.faults.throttle(2, method="POST", path=faults.CREATE)

Or in the foreground, to drive it from another process::

    python -m airflow_provider_kontext.testing.emulator --port 8765 --token T --path-prefix /replicate

The endpoints are Replicate's, shaped as its OpenAPI description says (create by model or by
version, get, list, cancel, stream, models and versions, files, the webhook secret, account), plus
``{base}/_emulator/faults``, ``/_emulator/state`` and ``/_emulator/reset`` to control it over HTTP.
Every request except those passes a gateway that applies the armed faults, checks the token,
applies the rate limits when asked (``rate_limit=``) and logs ``(method, path, status)``.

Where each part lives, in ``airflow_provider_kontext/testing/``:

- ``server.py``: :class:`FluxKontextEmulator`, the server thread, start and stop, introspection.
- ``cli.py``: the command line (this module runs it).
- ``app.py``: the routes, each mapped onto one store; ``gateway.py``: prefix, faults, token, rate
  limits and the request log in front of them; ``problems.py``: RFC 7807 error answers.
- ``service.py``: the state, one store per resource, the token check and ``/_emulator/state``;
  ``config.py``: the options.
- ``predictions.py``: create, get, list (``listing.py``), cancel, stream (``stream.py``), output
  files and web pages; ``create_request.py``: what a create may carry; ``edit_runner.py``: the
  edit and its offline ``input_image``; ``lifecycle.py``: a prediction's life over time;
  ``imaging.py``: the image edit itself.
- ``files.py``: uploads and signed downloads; ``model_catalog.py``: models and versions;
  ``webhooks.py``: signed webhook deliveries; ``faults.py``: fault injection;
  ``ratelimit.py``: the account's rate limits.
"""

from __future__ import annotations

import sys

from airflow_provider_kontext.testing.app import build_api
from airflow_provider_kontext.testing.cli import emulator_from_args, main
from airflow_provider_kontext.testing.problems import problem_response
from airflow_provider_kontext.testing.server import FluxKontextEmulator, KontextEmulator

__all__ = [
    "FluxKontextEmulator",
    "KontextEmulator",
    "build_api",
    "emulator_from_args",
    "main",
    "problem_response",
]

if __name__ == "__main__":
    sys.exit(main())
