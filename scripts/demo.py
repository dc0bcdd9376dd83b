"""``make demo``: run the example asset pipeline end to end in a real Airflow (``airflow dags test``).

With no token configured it starts the bundled emulator on 127.0.0.1 and points the connection
``flux_kontext_default`` at it; with ``REPLICATE_API_TOKEN`` (or ``AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT``)
set, the same DAG runs against Replicate and is billed. Prints each input and where its edit is.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "kontext_asset_pipeline"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_emulator(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_kontext.testing.emulator",
            "--port",
            str(port),
            "--prediction-seconds",
            "3",
        ],
        env=env,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/v1/account", timeout=1).ok:
                return process, base_url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("the emulator did not start within 30 s")


def main() -> int:
    out_dir = Path(os.environ.get("KONTEXT_DEMO_OUTPUT", ROOT / ".kontext-run" / "edits")).absolute()
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(ROOT / ".airflow_home"))
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "example_dags")
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    # Standalone runs a triggerer: let edits wait there (Airflow's own default keeps them in a worker).
    env.setdefault("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    emulator = None
    if "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT" in env:
        print("Using the connection in AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT (real predictions may be billed)")
    elif env.get("REPLICATE_API_TOKEN"):
        print("Using Replicate with REPLICATE_API_TOKEN (real predictions are billed)")
        env["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = json.dumps({"conn_type": "fluxkontext"})
    else:
        emulator, base_url = _start_emulator(env)
        print(f"No token configured: using the bundled emulator at {base_url}")
        env["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = json.dumps({"conn_type": "fluxkontext", "host": base_url})
    airflow = [sys.executable, "-m", "airflow"]
    try:
        subprocess.run([*airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        started = time.time()
        conf = json.dumps({"output_dir": str(out_dir)})
        run = subprocess.run([*airflow, "dags", "test", DAG_ID, "--conf", conf], env=env, check=False)
        if run.returncode != 0:
            print(f"airflow dags test {DAG_ID} failed (exit {run.returncode}); see the log above")
            return run.returncode
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(timeout=10)
    manifests = [m for m in out_dir.glob("*/manifest.json") if m.stat().st_mtime >= started - 1]
    if not manifests:
        print(f"The DAG ran but wrote no manifest under {out_dir}")
        return 1
    manifest = max(manifests, key=lambda m: m.stat().st_mtime)
    rows = json.loads(manifest.read_text())
    print(f"\n{DAG_ID} succeeded: {sum(len(r['outputs']) for r in rows)} edited images")
    for row in rows:
        for path in row["outputs"]:
            source = row.get("input_name") or row.get("input_image") or "?"
            print(f"  {source} -> {path}   (prediction {row['id']}, {row.get('predict_time') or 0:.1f}s)")
    print(f"Manifest: {manifest}\nContact sheet: {manifest.parent / 'contact_sheet.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
