#!/usr/bin/env bash
# Set-up of a cluster node (cluster.yaml's setup_commands; the loopback `ray up` runs the same): the runtime only,
# apart from the developer set-up (scripts/setup.sh: no browser, database server, stress-ng or test extra).
#   - Debian/Ubuntu packages: Python 3.11 with venv and headers (Ubuntu 22.04: universe; Debian 12: its default)
#     and what FFCV compiles against (pkg-config libopencv-dev libturbojpeg0-dev, a C++ compiler);
#   - ./.venv with the project and the exact pins of constraints.txt, rebuilt only when its stamp (the pins, the
#     project's dependencies, the Python version, the wheelhouse's listing) changed: a restarted node or a second
#     `ray up` spends seconds here;
#   - VARCON_WHEELHOUSE=<folder>: prebuilt wheels (e.g. FFCV's, built once for the image: `pip wheel ffcv==1.0.2
#     -w <folder>`) used before the registry, so nodes need not compile FFCV;
#   - the NVIDIA driver checked against the installed torch (python -m pipeline.node_check): one line and exit 1
#     on a GPU node whose driver is too old, before Ray starts there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${VARCON_PYTHON:-python3.11}
VENV=.venv
STAMP="$VENV/.varcon-node-installed"
APT_PACKAGES=(python3.11 python3.11-venv python3.11-dev g++ pkg-config libopencv-dev libturbojpeg0-dev)

log() { printf '[node-setup] %s\n' "$*"; }

source scripts/apt_packages.sh
mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
if ((${#missing[@]})); then
  log "installing packages: ${missing[*]}"
  apt_install "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

find_links=()
if [ -n "${VARCON_WHEELHOUSE:-}" ]; then
  [ -d "$VARCON_WHEELHOUSE" ] || { log "VARCON_WHEELHOUSE=$VARCON_WHEELHOUSE is not a folder"; exit 2; }
  find_links=(--find-links "$VARCON_WHEELHOUSE")
fi
want=$( { cat pyproject.toml constraints.txt; "$VENV/bin/python" --version;
          [ -z "${VARCON_WHEELHOUSE:-}" ] || ls -l "$VARCON_WHEELHOUSE"; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  log "environment up to date ($VENV)"
else
  log "installing the project and its pinned runtime dependencies into $VENV (first time: minutes; FFCV compiles)"
  rm -f "$STAMP"
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
  "$VENV/bin/python" -m pip install -q "${find_links[@]}" -c constraints.txt -e .
  "$VENV/bin/python" -m pip check
  echo "$want" > "$STAMP"
  log "done"
fi
"$VENV/bin/python" -m pipeline.node_check
