#!/usr/bin/env bash
# Idempotent set-up on a Debian machine (root or sudo): the Debian packages FFCV compiles against, a virtual
# environment in ./.venv, and the project installed with the exact, tested dependency set of constraints.txt.
# A second run with nothing changed only checks and exits (seconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
# chromium, chromium-driver (one Debian source, one version): the MLflow UI test, driven by Selenium;
# postgresql-15: the durable-tracking tests run a throw-away server of it;
# stress-ng: make test-contention's busy cores
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev chromium chromium-driver postgresql-15 stress-ng)
STAMP="$VENV/.varcon-installed"

log() { printf '[setup] %s\n' "$*"; }

source scripts/apt_packages.sh
mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
    # no auto-created 'main' cluster on port 5432: the tests start their own, in a temporary folder
    as_root mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.conf > /dev/null
  fi
  apt_install "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

# Re-install only when what defines the environment changed.
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  log "environment up to date ($VENV)"
  exit 0
fi
log "installing the project and its pinned dependencies into $VENV (first time: a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
"$VENV/bin/python" -m pip check
echo "$want" > "$STAMP"
log "done"
