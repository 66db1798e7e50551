#!/usr/bin/env bash
# Set-up of a cluster node (cluster.yaml's setup_commands; the loopback `ray up` runs the same): the runtime only,
# apart from the developer set-up (scripts/setup.sh: no browser, database server, stress-ng or test extra).
#   - Debian/Ubuntu packages: Python 3.11 with venv and headers (Ubuntu 22.04: universe; Debian 12: its default)
#     and what FFCV compiles against (pkg-config libopencv-dev libturbojpeg0-dev, a C++ compiler); sudo only for what
#     is missing;
#   - ./.venv with the project and the exact pins of constraints.txt, rebuilt only when its stamp (the pins, the
#     project's dependencies, the Python version, the wheelhouse's listing: setup_lib.sh) changed: a restarted node
#     or a second `ray up` spends seconds here;
#   - VARCON_PREBUILT_VENV (~/.varcon/cluster.env): a virtual environment prebuilt on the node image, used as ./.venv
#     while its stamp matches this checkout's (scripts/setup.sh and this script write it);
#   - VARCON_WHEELHOUSE: prebuilt wheels (e.g. FFCV's, built once for the image: `pip wheel ffcv==1.0.2 -w <folder>`)
#     used before the registry, so nodes need not compile FFCV;
#   - the NVIDIA driver checked against the installed torch (python -m pipeline.node_check): one line and exit 1
#     on a GPU node whose driver is too old, before Ray starts there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ ! -f "${VARCON_CLUSTER_ENV:-$HOME/.varcon/cluster.env}" ] || source scripts/node_env.sh  # optional: image builds

PYTHON=${VARCON_PYTHON:-python3.11}
VENV=.venv
APT_PACKAGES=(python3.11 python3.11-venv python3.11-dev g++ pkg-config libopencv-dev libturbojpeg0-dev)

log() { printf '[node-setup] %s\n' "$*"; }

source scripts/setup_lib.sh
mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
if ((${#missing[@]})); then
  log "installing packages: ${missing[*]}"
  apt_install "${missing[@]}"
fi

stamped() { [ -f "$1/$RUNTIME_STAMP_FILE" ] && [ "$(cat "$1/$RUNTIME_STAMP_FILE")" = "$(runtime_stamp "$1")" ]; }

prebuilt=${VARCON_PREBUILT_VENV:-}
if [ -n "$prebuilt" ] && [ -x "$prebuilt/bin/python" ] && stamped "$prebuilt"; then
  [ "$(readlink "$VENV" 2> /dev/null)" = "$prebuilt" ] || { rm -rf "$VENV"; ln -s "$prebuilt" "$VENV"; }
  log "using the prebuilt environment $prebuilt (its stamp matches this checkout's pins)"
else
  [ -z "$prebuilt" ] || log "the prebuilt environment $prebuilt does not match this checkout's pins: building $VENV"
  [ ! -L "$VENV" ] || rm "$VENV"  # never install into a prebuilt environment
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  if stamped "$VENV"; then
    log "environment up to date ($VENV)"
  else
    log "installing the project and its pinned runtime dependencies into $VENV (first time: minutes; FFCV compiles)"
    rm -f "$VENV/$RUNTIME_STAMP_FILE"
    find_links=()
    if [ -n "${VARCON_WHEELHOUSE:-}" ]; then
      [ -d "$VARCON_WHEELHOUSE" ] || { log "VARCON_WHEELHOUSE=$VARCON_WHEELHOUSE is not a folder"; exit 2; }
      find_links=(--find-links "$VARCON_WHEELHOUSE")
    fi
    "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
    "$VENV/bin/python" -m pip install -q "${find_links[@]}" -c constraints.txt -e .
    "$VENV/bin/python" -m pip check
    runtime_stamp "$VENV" > "$VENV/$RUNTIME_STAMP_FILE"
    log "done"
  fi
fi
# the environment's tools (ray, mlflow, varcon) in every login shell of this node: `ray attach`, `ray exec`, `ray down`
grep -q 'varcon/.venv/bin' ~/.bashrc 2> /dev/null || echo 'export PATH=$HOME/varcon/.venv/bin:$PATH' >> ~/.bashrc
"$VENV/bin/python" -m pipeline.node_check
