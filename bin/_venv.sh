# Sourced by bin/demo and bin/test: make sure .venv exists and holds this project (editable) with the
# test extras. Re-installs only when pyproject.toml changed (a stamp file records its hash).
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "aistock_pipelines needs Python 3.11+")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.aistock-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  rm -f .venv/.aistock-installed-*
  touch "$stamp"
fi
