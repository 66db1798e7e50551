#!/usr/bin/env bash
# Idempotent set-up on a Debian machine (root or sudo): the Debian packages FFCV compiles against, a virtual
# environment in ./.venv on the OS's Python 3.11, and the project installed with the exact, tested dependency set of
# constraints.txt. A second run with nothing changed only checks and exits (seconds).
# The OS's Python (Debian 12's default; the cluster's nodes run the same from Ubuntu's packages, scripts/node_setup.sh)
# rather than whichever python3 is first on PATH: every user can run it, so the loopback `ray up` test's node user
# (an unprivileged account) reuses this environment as a prebuilt one, as a node image would offer it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-/usr/bin/python3.11}
VENV=.venv
# chromium, chromium-driver (one Debian source, one version): the MLflow UI test, driven by Selenium;
# postgresql-15: the durable-tracking tests run a throw-away server of it;
# stress-ng: make test-contention's busy cores;
# openssh-server, openssh-client, rsync, netcat-openbsd: the loopback `ray up` (an sshd on 127.0.0.1, reached through
# an `nc` proxy command; Ray's launcher copies its file mounts with rsync); acl: that test's node user may pass
# through the folders above this checkout's .venv (setfacl, only for that user, removed after)
APT_PACKAGES=(python3.11 python3.11-venv python3.11-dev pkg-config libopencv-dev libturbojpeg0-dev chromium
              chromium-driver postgresql-15 stress-ng openssh-server openssh-client rsync netcat-openbsd acl)
STAMP="$VENV/.varcon-installed"

log() { printf '[setup] %s\n' "$*"; }

source scripts/setup_lib.sh
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

if [ -f "$VENV/pyvenv.cfg" ] && ! grep -qx "executable = $(readlink -f "$PYTHON")" "$VENV/pyvenv.cfg"; then
  log "recreating $VENV on $PYTHON (it was made with another Python)"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

# Re-install only when what defines the environment changed.
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  # a superset of a node's runtime: reusable as a prebuilt one (scripts/node_setup.sh checks this stamp)
  runtime_stamp "$VENV" > "$VENV/$RUNTIME_STAMP_FILE"
  log "environment up to date ($VENV)"
  exit 0
fi
log "installing the project and its pinned dependencies into $VENV (first time: a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
"$VENV/bin/python" -m pip check
runtime_stamp "$VENV" > "$VENV/$RUNTIME_STAMP_FILE"
echo "$want" > "$STAMP"
log "done"
