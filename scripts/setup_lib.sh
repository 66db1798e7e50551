# Sourced by scripts/setup.sh and scripts/node_setup.sh: which Debian/Ubuntu packages are missing, installing them
# (root or sudo), and the stamp of a runtime environment.
missing_packages() {  # prints each of "$@" that dpkg does not list as installed
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {  # installs "$@" without recommends, keeping existing configuration files
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confold "$@"
}

# What defines a virtual environment's runtime (run from the repository root): the project's dependencies, the exact
# pins, the Python it runs on, and the wheelhouse's listing if one is used. A venv holding this stamp in
# RUNTIME_STAMP_FILE has every runtime pin installed; node_setup.sh reuses such a venv (its own, or a prebuilt one).
RUNTIME_STAMP_FILE=.varcon-runtime
runtime_stamp() {  # runtime_stamp VENV
  { cat pyproject.toml constraints.txt; "$1/bin/python" --version;
    [ -z "${VARCON_WHEELHOUSE:-}" ] || ls -l "$VARCON_WHEELHOUSE"; } | sha256sum | cut -d' ' -f1
}
