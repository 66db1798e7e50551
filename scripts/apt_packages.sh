# Sourced by scripts/setup.sh and scripts/node_setup.sh: which Debian/Ubuntu packages are missing, and installing
# them (root or sudo).
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
