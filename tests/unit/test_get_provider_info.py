from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

from airflow_provider_kontext import __version__
from airflow_provider_kontext.compat import AIRFLOW_V_3_2_PLUS
from airflow_provider_kontext.get_provider_info import get_provider_info
from airflow_provider_kontext.hooks.connection import SETTINGS
from airflow_provider_kontext.hooks.kontext import FluxKontextHook


def test_entry_point_returns_provider_info() -> None:
    (ep,) = [
        e
        for e in entry_points(group="apache_airflow_provider")
        if e.value.startswith("airflow_provider_kontext")
    ]
    info = ep.load()()
    assert info["package-name"] == "airflow-provider-kontext"
    assert info["versions"] == [__version__]
    (conn,) = info["connection-types"]
    assert conn["connection-type"] == FluxKontextHook.conn_type == "fluxkontext"
    assert conn["hook-class-name"] == f"{FluxKontextHook.__module__}.{FluxKontextHook.__name__}"


def test_ui_field_behaviour_matches_provider_info() -> None:
    (conn,) = get_provider_info()["connection-types"]
    behaviour = FluxKontextHook.get_ui_field_behaviour()
    assert behaviour == {key.replace("-", "_"): value for key, value in conn["ui-field-behaviour"].items()}
    assert behaviour["hidden_fields"] == ["schema", "port", "login"]
    assert conn["ui-field-behaviour"]["relabeling"]["password"] == "API Token"


def test_airflow_registers_the_connection_type_and_form() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-kontext" in manager.providers
    hook_info = manager.hooks["fluxkontext"]
    assert hook_info is not None
    assert hook_info.hook_class_name.endswith("FluxKontextHook")
    if not AIRFLOW_V_3_2_PLUS:
        return  # 3.1 builds the form on the FAB path, in the API server only: see the UI test below
    assert manager.field_behaviours["fluxkontext"]["relabeling"]["host"] == "Base URL"
    widgets = {name.rsplit("__", 1)[-1] for name in manager.connection_form_widgets if "fluxkontext" in name}
    assert {setting.name for setting in SETTINGS} == widgets


def test_every_listed_module_imports_and_holds_its_classes() -> None:
    import importlib

    info = get_provider_info()
    expected = {
        "hooks": ["FluxKontextHook"],
        "operators": ["FluxKontextEditOperator", "FluxKontextBatchEditOperator"],
        "sensors": ["FluxKontextPredictionSensor"],
        "triggers": ["FluxKontextPredictionTrigger", "FluxKontextBatchTrigger"],
    }
    for kind, class_names in expected.items():
        (entry,) = info[kind]
        modules = entry["python-modules"]
        assert len(modules) == len(class_names), (kind, modules)
        for module, class_name in zip(modules, class_names, strict=True):
            assert hasattr(importlib.import_module(module), class_name), (kind, module)


def test_the_ui_shows_the_form_with_labels_and_extra_fields() -> None:
    """Check what the connection form's UI endpoint serves, on every Airflow version.

    What the connection form's UI endpoint serves: on 3.1 it comes from the hook's methods, on
    3.2+ from the declarative provider info; the same labels and fields either way. Asked in a fresh
    interpreter, like the API server: ``ProvidersManager`` is a process-wide singleton that other
    tests have already initialised without the UI's form machinery.
    """
    script = (
        "import json\n"
        "from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService\n"
        "(meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == 'fluxkontext']\n"
        "print('META=' + json.dumps(meta.model_dump(), default=str))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("META=")]
    fields = json.loads(line.removeprefix("META="))
    assert fields["standard_fields"]["host"]["title"] == "Base URL"
    assert fields["standard_fields"]["password"]["title"] == "API Token"
    assert fields["standard_fields"]["login"]["hidden"] is True
    extra = fields["extra_fields"]
    assert {setting.name for setting in SETTINGS} == set(extra)
    # Empty in the form (not 5): a saved form must not pin every default into the connection.
    assert extra["max_retries"]["value"] is None
    assert "Empty: 5; at least 0." in extra["max_retries"]["description"]
    assert "integer" in extra["max_retries"]["schema"]["type"]
