#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it.
# torch goes first and pinned: the project's range admits 2.13.0, so pip then pulls no other
# torch (an unpinned torch would be a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "installing torch==${TORCH_VERSION:-2.13.0} (CPU build unless a CUDA index is configured)"
  "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
# Reinstall only when the project's metadata changed since the last install.
stamp="$VENV/.kvstore-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing kvstore$EXTRAS"
  "$VENV/bin/python" -m pip install -q -e ".$EXTRAS"
  touch "$stamp"
fi
