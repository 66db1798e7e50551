#!/usr/bin/env bash
# The suite (default: the cluster tier) with a busy process on every core beside it: Debian's stress-ng, one CPU
# worker per core, for as long as pytest runs. Flaky timing shows up here first. Hang detectors may be longer than
# in CI (pytest-timeout 1800 s a test), never an assertion. Arguments go to pytest (default: -m cluster).
#   make test-contention                      # the cluster tier
#   bash scripts/test_under_contention.sh     # the same
#   bash scripts/test_under_contention.sh tests/test_tune_sweeps.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v stress-ng > /dev/null || { echo "stress-ng is not installed: run make setup" >&2; exit 2; }
cores=$(nproc)
stress-ng --cpu "$cores" --cpu-method matrixprod --quiet &
busy=$!
trap 'kill "$busy" 2> /dev/null || true; wait "$busy" 2> /dev/null || true' EXIT
echo "[contention] stress-ng: $cores busy CPU workers (pid $busy) beside pytest"
if (($#)); then args=("$@"); else args=(-m cluster); fi
.venv/bin/python -m pytest --timeout=1800 "${args[@]}"
