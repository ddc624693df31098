# Sourced by bin/demo and bin/test: make sure .venv exists and holds this project (editable) with the
# test extras (dev: pytest, dg; browser: Playwright for the browser test). Re-installs only when
# pyproject.toml changed (a stamp file records its hash). One console line per outcome; pip's own output
# goes to .venv/pip-install.log, its latest line shown as progress while it runs.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "aistock_pipelines needs Python 3.11+")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.aistock-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log=.venv/pip-install.log
  started=$SECONDS
  echo "==> install: pip install -e '.[dev,browser]' into .venv (first run or pyproject.toml changed; log: $log)"
  : >"$log"
  ( # progress: pip's latest line, in place on a terminal, every 30 s elsewhere
    while sleep 2; do
      line=$(grep -v "^WARNING: Location" "$log" | tail -n 1 | cut -c1-100)
      if [ -t 1 ]; then printf '\r\033[K==> install: %s … %d s' "$line" $((SECONDS - started))
      elif [ $(((SECONDS - started) % 30)) -lt 2 ]; then echo "==> install: $line … $((SECONDS - started)) s"; fi
    done
  ) &
  progress=$!
  ok=1
  { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[dev,browser]'; } >>"$log" 2>&1 || ok=0
  kill "$progress" 2>/dev/null || true
  wait "$progress" 2>/dev/null || true
  [ -t 1 ] && printf '\r\033[K'
  if [ "$ok" = 0 ]; then
    tail -n 30 "$log"
    echo "==> install: FAILED after $((SECONDS - started)) s (full log: $log)"
    exit 1
  fi
  rm -f .venv/.aistock-installed-*
  touch "$stamp"
  echo "==> install: done ($((SECONDS - started)) s)"
else
  echo "==> install: .venv up to date (0 s)"
fi
