#!/usr/bin/env bash
# The suite (default: the cluster tier) with a busy process on every core beside it: Debian's stress-ng, one CPU
# worker per core, for as long as the tests run. Flaky timing shows up here first.
#
# - Hang detectors only, never an assertion, are stretched: pytest-timeout's limit per test and the tests' own waits
#   for a server, a sweep or a node are VARCON_TEST_PATIENCE times longer than in CI (tests/services.patience;
#   default 4; measured on 2 cores: the ASHA sweep test 284 s here against 193 s idle, the autoscaling test 101 s
#   against 73 s).
# - Ray starts its workers at niceness 15 so that its own control plane stays responsive; beside a busy process at
#   niceness 0 each such worker then gets about 4% of a core (ps, 2 cores): the ASHA sweep test had not finished
#   after 10 min, the cluster tier took 2 h 05 against 21 min idle. That measures Ray's priorities, not the tests'
#   timing. Here Ray's workers run at the busy process's niceness (RAY_worker_niceness=0), so every process of the
#   tests shares the cores with it alike.
#
#   make test-contention                                   # the cluster tier
#   bash scripts/test_under_contention.sh tests/test_tune_sweeps.py   # arguments go to pytest
#   bash scripts/test_under_contention.sh --ci             # CI's own command (.ci/run) beside the busy process
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v stress-ng > /dev/null || { echo "stress-ng is not installed: run make setup" >&2; exit 2; }
cores=$(nproc)
stress-ng --cpu "$cores" --cpu-method matrixprod --quiet &
busy=$!
trap 'kill "$busy" 2> /dev/null || true; wait "$busy" 2> /dev/null || true' EXIT
export VARCON_TEST_PATIENCE=${VARCON_TEST_PATIENCE:-4} RAY_worker_niceness=0
echo "[contention] stress-ng: $cores busy CPU workers (pid $busy); hang detectors ${VARCON_TEST_PATIENCE}x;" \
     "Ray's workers at niceness 0"
if [[ ${1:-} == --ci ]]; then
  CI=true bash .ci/run
elif (($#)); then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -m cluster
fi
