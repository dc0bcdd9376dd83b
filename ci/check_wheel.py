"""Check the built wheel as a user gets it, from outside the source tree.

Run by .ci/run with the python of a fresh venv holding only the wheel (no extras, no dependency
groups).

Checks: the metadata (license file, classifiers, URLs, only the user-facing extras published:
``emulator``, ``openlineage`` and ``ui``), that the package is the installed one, that importing the
operator, hook and trigger loads neither FastAPI nor Pillow nor uvicorn, that the emulator without
its extra says which extra to install, and that ``airflow providers list`` shows the provider.
Exits non-zero, saying what is wrong, otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

EMULATOR_ONLY = ("fastapi", "PIL", "uvicorn")


def check_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        license_files = [n for n in names if "/licenses/" in n and n.endswith("LICENSE")]
        assert license_files, f"no LICENSE in the wheel: {names}"
        assert "Apache License" in archive.read(license_files[0]).decode()
    assert not [n for n in names if n.startswith("tests/")], "tests/ shipped in the wheel"
    assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
    extras = metadata.get_all("Provides-Extra") or []
    assert sorted(extras) == ["emulator", "openlineage", "ui"], (
        f"published extras: {extras} (only what users install; development groups must not be)"
    )
    classifiers = metadata.get_all("Classifier") or []
    for wanted in [f"Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)] + [
        "Framework :: Apache Airflow",
        "Framework :: Apache Airflow :: Provider",
    ]:
        assert wanted in classifiers, f"missing classifier {wanted!r}"
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert "Source" in urls, urls
    assert metadata["Requires-Python"] == ">=3.10"
    required = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    airflow = [r for r in required if r.startswith("apache-airflow")]
    assert airflow == ["apache-airflow>=3.1.8"], airflow
    print(f"metadata ok: extras {extras}, {len(classifiers)} classifiers, urls {sorted(urls)}")


def check_imports() -> None:
    script = (
        "import sys\n"
        "import airflow_provider_kontext, airflow_provider_kontext.operators.kontext\n"
        "import airflow_provider_kontext.hooks.kontext, airflow_provider_kontext.triggers.kontext\n"
        "import airflow_provider_kontext.plugins.kontext  # loaded by every Airflow process\n"
        f"loaded = [m for m in {EMULATOR_ONLY!r} if m in sys.modules]\n"
        "assert not loaded, f'importing the operator loaded {loaded}'\n"
        "print(airflow_provider_kontext.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    location = out.stdout.strip().splitlines()[-1]
    assert "site-packages" in location, f"imported from {location}, not the installed wheel"
    print(f"operator imports without {', '.join(EMULATOR_ONLY)}: ok ({location})")

    script = "import airflow_provider_kontext.testing.emulator"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode != 0, "the emulator imported without its extra?"
    assert "pip install 'airflow-provider-kontext[emulator]'" in out.stderr, out.stderr[-2000:]
    print("emulator without its extra: " + out.stderr.strip().splitlines()[-1])


def check_providers_list() -> None:
    airflow = Path(sys.executable).parent / "airflow"
    out = subprocess.run(
        [str(airflow), "providers", "list", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    start = out.stdout.index("[")
    providers = {row["package_name"]: row for row in json.loads(out.stdout[start:])}
    assert "airflow-provider-kontext" in providers, sorted(providers)
    print(f"airflow providers list: {providers['airflow-provider-kontext']}")


def main() -> None:
    (wheel,) = [Path(arg) for arg in sys.argv[1:] if arg.endswith(".whl")]
    check_metadata(wheel)
    check_imports()
    check_providers_list()


if __name__ == "__main__":
    main()
