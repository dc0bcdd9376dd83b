from __future__ import annotations

from importlib.metadata import entry_points

from airflow_provider_kontext import __version__
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
    assert FluxKontextHook.get_ui_field_behaviour() == conn["ui-field-behaviour"]
    assert conn["ui-field-behaviour"]["relabeling"]["password"] == "API Token"


def test_airflow_registers_the_connection_type_and_form() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-kontext" in manager.providers
    hook_info = manager.hooks["fluxkontext"]
    assert hook_info is not None
    assert hook_info.hook_class_name.endswith("FluxKontextHook")
    assert manager.field_behaviours["fluxkontext"]["relabeling"]["host"] == "Base URL"
    widgets = {name.rsplit("__", 1)[-1] for name in manager.connection_form_widgets if "fluxkontext" in name}
    assert {setting.name for setting in SETTINGS} == widgets


def test_every_listed_module_imports_and_holds_its_classes() -> None:
    import importlib

    info = get_provider_info()
    expected = {
        "hooks": "FluxKontextHook",
        "operators": "FluxKontextEditOperator",
        "sensors": "FluxKontextPredictionSensor",
        "triggers": "FluxKontextPredictionTrigger",
    }
    for kind, class_name in expected.items():
        (entry,) = info[kind]
        (module,) = entry["python-modules"]
        assert hasattr(importlib.import_module(module), class_name), (kind, module)
