#!/usr/bin/env bash
# Create .venv (if missing) and install anystep with pinned dependencies; says what it does, stops
# at the first failure. CPU torch 2.13.0 goes in first: a bare `torch` requirement would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.anystep-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements.lock ] \
   && [ "$stamp" -nt requirements-studio.lock ]; then
  exit 0
fi
step() { echo "setup_env: $*" >&2; }
pip_quiet() {  # pip's output only when it fails
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup_env: error: pip install $* failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
step "installing CPU torch 2.13.0 (the largest download, about a minute)"
pip_quiet "torch==2.13.0"
step "installing the pinned dependencies (requirements.lock, requirements-studio.lock)"
# One resolve over both files: the studio extra (Gradio) and the browser test's Selenium come
# with the core pins, never in place of them.
pip_quiet -r requirements.lock -r requirements-studio.lock
step "installing anystep (editable)"
pip_quiet --no-deps -e .
.venv/bin/python -c "import anystep, diffusers, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch "$stamp"
step "ready: .venv/bin/anystep"
