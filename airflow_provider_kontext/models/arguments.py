"""Checks of operator and sensor arguments, made when the DAG file is parsed."""

from __future__ import annotations

import math
from typing import Any


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    integer: bool = False,
) -> float:
    """``value`` as a finite number within bounds (``minimum=None``: must be positive).

    :raises ValueError: naming the argument, for anything else (a string that is not a number,
        ``None``, NaN, infinity, a fraction where an integer is needed, out of range).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r:.100}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r:.100}")
    if integer and not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r:.100}")
    if (number <= 0 if minimum is None else number < minimum) or (maximum is not None and number > maximum):
        allowed = "positive" if minimum is None else f"at least {minimum:g}"
        if maximum is not None:
            allowed += f" and at most {maximum:g}"
        raise ValueError(f"{name} must be {allowed}, got {value!r:.100}")
    return number


def default_deferrable() -> bool:
    """Tell whether operators and sensors wait in the triggerer when ``deferrable`` is not given.

    That is Airflow's ``[operators] default_deferrable`` setting, as in official providers (``False``
    unless the deployment sets it, since deferred tasks need a running triggerer).

    Read when a task is built, not when this module is imported. ``airflow.configuration.conf``
    reads the same environment and ``airflow.cfg`` on Airflow 3.1, 3.2 and 3.3 (the Task SDK's own
    ``conf`` exists only from 3.2).
    """
    from airflow.configuration import conf

    return conf.getboolean("operators", "default_deferrable", fallback=False)
