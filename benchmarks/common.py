"""What the scenarios share: the emulator in its own process, a clean environment for child
processes (nothing may leave 127.0.0.1), machine facts and small statistics helpers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
PYTHON = sys.executable
MODEL = "black-forest-labs/flux-kontext-dev"
#: An 8x8 red PNG: the edits' input image, inline (the emulator is offline).
TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdt"
    "BIA0MoBFD5jqJkAAAAASUVORK5CYII="
)
PROMPT = "make it a watercolour"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child process: no proxy (so nothing is routed off this machine),
    no token from the caller's shell, Airflow quiet about examples.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and key not in ("REPLICATE_API_TOKEN", "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT")
    }
    env.update(
        {
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(extra)
    return env


def compile_bytecode() -> float:
    """Compile the installed packages and the provider to bytecode, as ``pip install`` does.

    A deployment's task processes load ``.pyc`` files. A venv made by uv without
    ``--compile-bytecode``, run with ``PYTHONDONTWRITEBYTECODE=1`` (this machine's shell sets it),
    compiles every module a task process imports after its fork (the provider, requests, ...)
    from source, in every task start: it more than doubled the workers' CPU per edit here.
    Returns the seconds it took (little once compiled: only changed files are compiled again).
    """
    import compileall
    import sysconfig

    started = time.monotonic()
    for folder in (sysconfig.get_paths()["purelib"], str(ROOT / "airflow_provider_kontext")):
        compileall.compile_dir(folder, quiet=1, workers=0)
    return time.monotonic() - started


def connection_json(base_url: str) -> str:
    """``AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT`` for the emulator (no token: it runs without auth)."""
    return json.dumps({"conn_type": "fluxkontext", "host": base_url})


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children) from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class EmulatorProcess:
    """``python -m airflow_provider_kontext.testing.emulator`` on 127.0.0.1 in its own process."""

    def __init__(
        self,
        *,
        prediction_seconds: float,
        start_seconds: float = 0.3,
        output_scale: float = 0.02,
        token: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.args = [
            PYTHON,
            "-m",
            "airflow_provider_kontext.testing.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--prediction-seconds",
            str(prediction_seconds),
            "--start-seconds",
            str(start_seconds),
            "--output-scale",
            str(output_scale),
        ]
        if token:
            self.args += ["--token", token]
        self.args += list(extra_args)
        self.prediction_seconds = prediction_seconds
        self.start_seconds = start_seconds
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env()
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the emulator did not start (printed {line!r})")
        self.base_url = line
        self.state()  # answers
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.base_url}{path}", method=method)  # noqa: S310 (http://127.0.0.1 only)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            result: dict[str, Any] = json.load(response)
        return result

    def state(self) -> dict[str, Any]:
        """``GET /_emulator/state``."""
        return self._call("GET", "/_emulator/state")

    def reset(self) -> None:
        """Forget predictions and the request log (between runs, to keep the emulator small)."""
        self._call("POST", "/_emulator/reset")


def count_requests(state: dict[str, Any]) -> tuple[int, int]:
    """(GET /v1/predictions/{id}, all API requests) from a state taken after :meth:`reset`."""
    total = int(state["request_count"])
    return total - int(state["created_count"]), total


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100, nearest rank); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, str]:
    """What the figures depend on: CPU, cores, memory, load, Python and the packages measured."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    packages = ", ".join(
        f"{name} {_version(name)}" for name in ("apache-airflow", "aiohttp", "httpx", "replicate", "pydantic")
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": packages,
        "load average at start (1, 5, 15 min)": load,
    }


def git_revision() -> str:
    """The checked-out commit (and whether the tree has changes), for the report."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "airflow_provider_kontext"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" + uncommitted changes in the package" if dirty else "")


class Stopwatch:
    """Wall time of a section, for the report's timing line."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
