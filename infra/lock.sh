#!/usr/bin/env bash
# Re-resolve requirements.lock from pyproject.toml (runtime + the dev and lightgbm extras) with pip-tools.
# usage: infra/lock.sh [PYTHON]   (default .venv/bin/python; `make lock` runs it)
# Resolve on the machine kind CI runs on, then run the tests before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
"$PY" -m pip install --quiet "pip-tools>=7.4,<8"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$PY" -m piptools compile --quiet --extra dev --extra lightgbm --strip-extras --no-emit-index-url --no-emit-find-links \
    --no-header --annotation-style line -o "$out" pyproject.toml
{
    echo "# The tested versions of every package ringflow and its dev extra install (pip-tools)."
    echo "# make install installs from this file; refresh it with \`make lock\` after changing pyproject.toml's"
    echo "# dependencies, and commit it. torch is pinned without its local label (2.13.0 matches 2.13.0+cpu):"
    echo "# TORCH_INDEX picks the build. horovod is not here: infra/install_horovod.sh builds it."
    # setuptools is pip-tools' "unsafe" section; the torch line loses its local label (+cpu, +cu128)
    grep -v '^#\|^$\|^setuptools' "$out" | sed -E 's/^torch==([0-9.]+)\+[a-z0-9]+ /torch==\1 /'
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pins"
