"""Run the emulator from the command line, in the foreground, until SIGTERM or SIGINT.

``python -m airflow_provider_kontext.testing.emulator --port 8765 --token T`` prints the base URL
once the port accepts connections (a script can wait for that line) and serves until stopped.
Bad options exit with status 2 and a usage message; a port that cannot be bound exits with 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from airflow_provider_kontext.testing.lifecycle import REALISTIC_TIMING, Timing
from airflow_provider_kontext.testing.server import FluxKontextEmulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_kontext.testing.emulator",
        description="Serve an offline emulator of Replicate's predictions API for FLUX.1 Kontext.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'")
    parser.add_argument("--path-prefix", default="", help="serve the API below this path, e.g. /replicate")
    parser.add_argument(
        "--prediction-seconds", type=float, default=None, help="how long processing lasts (mean; default 3)"
    )
    parser.add_argument(
        "--start-seconds", type=float, default=None, help="how long starting lasts (mean; default 0.3)"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=None,
        help="each prediction's phases last mean*(1±SPREAD), drawn per prediction (default 0: fixed)",
    )
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="flux-kontext-dev's timing on Replicate: 0.6 s starting, 4 s processing, spread 0.5 "
        "(explicit --start-seconds, --prediction-seconds, --spread win)",
    )
    parser.add_argument("--timing-seed", type=int, default=0, help="seed for the per-prediction durations")
    parser.add_argument(
        "--rate-limit",
        default=None,
        help="enforce rate limits: 'replicate' (600 creates/min, 3000/min others, short bursts), "
        "'low-credit' (1/s, 6/min) or 'CREATES,OTHERS[,BURST_SECONDS]' per minute (default: none)",
    )
    parser.add_argument("--retention-seconds", type=float, default=3600.0, help="how long outputs are kept")
    parser.add_argument("--output-scale", type=float, default=1.0, help="factor on output image sizes")
    parser.add_argument("--fault-seed", type=int, default=0, help="seed for probability faults")
    return parser


def emulator_from_args(args: argparse.Namespace) -> FluxKontextEmulator:
    """Return the (not yet started) emulator the command line asks for.

    :raises ValueError: for bad options (a negative duration, a bad rate limit).
    """
    base = REALISTIC_TIMING if args.realistic else Timing()
    return FluxKontextEmulator(
        token=args.token,
        path_prefix=args.path_prefix,
        prediction_seconds=_given(args.prediction_seconds, base.prediction_seconds),
        start_seconds=_given(args.start_seconds, base.start_seconds),
        spread=_given(args.spread, base.spread),
        timing_seed=args.timing_seed,
        retention_seconds=args.retention_seconds,
        output_scale=args.output_scale,
        host=args.host,
        port=args.port,
        fault_seed=args.fault_seed,
        rate_limit=args.rate_limit,
    )


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground: print its base URL, serve until SIGTERM or SIGINT."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        emulator = emulator_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            emulator.start()
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(emulator.base_url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Kontext emulator stopped", file=sys.stderr, flush=True)
    return 0
