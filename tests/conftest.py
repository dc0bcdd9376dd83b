"""Shared fixtures. Airflow reads AIRFLOW_HOME at import time, so it is set before anything imports it."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="kontext-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
# The suites (and the e2e subprocesses, which inherit this environment) exercise the deferred path
# when a test does not choose, as a deployment with a triggerer sets it: Airflow's own default of
# [operators] default_deferrable is False. The tests of that default set the variable themselves.
os.environ.setdefault("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
