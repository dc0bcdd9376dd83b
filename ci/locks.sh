#!/usr/bin/env bash
# Locked dependency sets, so that a release elsewhere cannot turn CI red without a change of ours.
#
#   ci/locks.sh lock    re-resolve every lock from pyproject.toml and its ci/pins file (`make lock`)
#   ci/locks.sh check [NAME...]
#                       install the NEWEST releases for each entry (its pins, no lock), run the unit
#                       tests and pip-audit, and say what broke and which versions moved since the
#                       lock (`make deps-check`; not run by CI, run it before re-locking)
#
# One lock per CI matrix entry, used as a constraints file (`uv pip install -c`) by .ci/run and the
# Makefile: `dev` (universal, Python 3.10-3.13: `make venv`/`make test`/`make bench`, CI's first stage,
# the distributed test and the wheel check) and one per Airflow/Python pair of the matrix. A dependency
# added to pyproject.toml but not yet locked still installs (unconstrained) until the next `make lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
export UV_PYTHON_DOWNLOADS=never

# name | Python | pins | what to resolve besides the provider's own dependencies
ENTRIES=(
    "dev|3.10|ci/pins/airflow-3.3.txt|--universal --all-extras --group pyproject.toml:test --group pyproject.toml:lint --group pyproject.toml:bench --group pyproject.toml:distributed --group pyproject.toml:browser --group pyproject.toml:docs"
    "af31-py310|3.10|ci/pins/airflow-3.1.txt|--extra emulator --group pyproject.toml:test"
    "af32-py311|3.11|ci/pins/airflow-3.2.txt|--extra emulator --group pyproject.toml:test"
    "af330-py312|3.12|ci/pins/airflow-3.3.0.txt|--extra emulator --group pyproject.toml:test"
    "af33-py313|3.13|ci/pins/airflow-3.3.txt|--extra emulator --group pyproject.toml:test"
)

python_for() { # pyenv's newest X.Y, else pythonX.Y on PATH
    local found=""
    if command -v pyenv >/dev/null; then
        found=$(ls -d "$(pyenv root)"/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n1 || true)
    fi
    [ -n "$found" ] || found=$(command -v "python$1" || true)
    [ -n "$found" ] || { echo "no Python $1" >&2; return 1; }
    echo "$found"
}

lock() {
    local entry name py pins args
    for entry in "${ENTRIES[@]}"; do
        IFS='|' read -r name py pins args <<<"$entry"
        echo "=== lock $name (Python $py, $pins)"
        # shellcheck disable=SC2086
        "$UV" pip compile -q pyproject.toml "$pins" $args --python-version "$py" \
            --no-emit-package airflow-provider-kontext --no-header --annotation-style line \
            -o "ci/locks/$name.txt"
        sed -i "1i # Locked by ci/locks.sh on $(date -u +%F) for $name (Python $py, $pins); regenerate with make lock." \
            "ci/locks/$name.txt"
    done
}

check() { # check [NAME...]: every entry, or the named ones
    local entry name py pins args dir broke=() report=.deps-check/report.txt
    mkdir -p .deps-check
    : >"$report"
    for entry in "${ENTRIES[@]}"; do
        IFS='|' read -r name py pins args <<<"$entry"
        if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
        [ "$name" = dev ] && py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        dir=.deps-check/$name
        echo "=== $name: newest releases on Python $py with $pins, no lock" | tee -a "$report"
        rm -rf "$dir"
        "$UV" venv -q --python "$(python_for "$py")" "$dir"
        if [ "$name" = dev ]; then
            "$UV" pip install -q --python "$dir/bin/python" -r "$pins" -e '.[emulator,openlineage,ui]' \
                --group test --group lint --group bench --group distributed --group browser --group docs
        else
            "$UV" pip install -q --python "$dir/bin/python" -r "$pins" -e '.[emulator]' --group test
        fi
        "$UV" pip freeze -q --python "$dir/bin/python" --exclude-editable | sort >"$dir/freeze.txt"
        grep -E '^[A-Za-z0-9_.-]+==' "ci/locks/$name.txt" | sed 's/ *;.*//; s/ *#.*//' | sort -u >"$dir/lock.txt"
        echo "moved since the lock (< locked, > newest):" | tee -a "$report"
        diff "$dir/lock.txt" "$dir/freeze.txt" | grep '^[<>]' | tee -a "$report" || true
        if AIRFLOW_HOME="$PWD/$dir/airflow_home" "$dir/bin/python" -m pytest -q -p no:cacheprovider \
            --ignore=tests/e2e -x >"$dir/pytest.log" 2>&1; then
            echo "unit tests: passed ($(tail -n1 "$dir/pytest.log"))" | tee -a "$report"
        else
            echo "unit tests: FAILED ($(tail -n1 "$dir/pytest.log")); log: $dir/pytest.log" | tee -a "$report"
            broke+=("$name")
        fi
        if ! "$(dirname "$UV")/pip-audit" -r "$dir/freeze.txt" --no-deps --disable-pip \
            --progress-spinner off >"$dir/audit.log" 2>&1; then
            echo "pip-audit: vulnerabilities found; log: $dir/audit.log" | tee -a "$report"
            broke+=("$name (audit)")
        fi
    done
    if [ ${#broke[@]} -gt 0 ]; then
        echo "=== broken by the newest releases: ${broke[*]} (bisect the moved versions, pin in ci/pins/, then make lock)" | tee -a "$report"
        return 1
    fi
    echo "=== every entry passes on the newest releases: make lock is safe" | tee -a "$report"
}

case "${1:-}" in
    lock) lock ;;
    check) shift; check "$@" ;;
    *) echo "usage: $0 lock | check [NAME...]" >&2; exit 2 ;;
esac
