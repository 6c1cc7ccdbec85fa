#!/usr/bin/env bash
# Regenerate the Python gRPC code from proto/ into the installable package kvstore/v1/.
# The output depends on the grpcio-tools version, pinned in pyproject.toml's test extra;
# tests/test_proto.py fails when the committed code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -I proto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/kvstore/v1/*.proto
