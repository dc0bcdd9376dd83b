"""Provide an auth manager for the plugin's browser test: Airflow's simple one, with a limited user.

An auth manager for the plugin's browser test: Airflow's simple auth manager, except that the
user ``bob`` may read only the DAGs named in ``KONTEXT_TEST_BOB_DAGS`` (comma-separated).

The simple auth manager gives every role read access to every DAG; the plugin must follow what an
auth manager decides per DAG, so the test needs one that decides per DAG.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class PerDagAuthManager(SimpleAuthManager):
    """``bob`` reads only his DAGs; everything else as the simple auth manager decides."""

    def is_authorized_dag(
        self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None
    ) -> bool:
        if user.get_name() == "bob":
            allowed = {d for d in os.environ.get("KONTEXT_TEST_BOB_DAGS", "").split(",") if d}
            if details is None or details.id is None or details.id not in allowed:
                return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )
