"""Will `scripts/node_setup.sh` install on the cluster's nodes? Every runtime pin resolved for the nodes' Python
and platform from the package registry, without installing anything (``make resolve-check``; it needs the
registry, so it is a make target that .ci/run calls, not a test).

1. The project's dependencies but FFCV, under constraints.txt, with pip's dry run for the nodes' interpreter:
   ``pip install --dry-run --ignore-installed --only-binary=:all: --python-version V --platform P -c
   constraints.txt ...``. Every package must come as a wheel for that Python and platform (a node compiles FFCV
   only) and at its pinned version.
2. FFCV, which nodes compile: its source distribution at the pin, its build requirements and its dependencies,
   resolved by the same dry run with this interpreter (pip builds the sdist's metadata in an isolated build
   environment, so the build requirements are fetched too); this interpreter's Python must be the nodes'.

    python scripts/check_node_resolve.py [--python-version 3.11] [--platform manylinux_2_28_x86_64]

Prints one line per part; exit 1 naming what does not resolve.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
SOURCE_BUILT = {"ffcv"}  # compiled on the node (scripts/node_setup.sh installs its Debian build packages)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pins(path: Path) -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[_name(name)] = version.strip()
    return found


def platforms(platform: str) -> list[str]:
    """``platform`` and every older tag a node of it also installs: pip takes a custom ``--platform`` as that
    one tag only, so ``manylinux_2_28_x86_64`` is expanded to ``manylinux_2_28 ... manylinux_2_5`` and the
    legacy aliases (``manylinux2014`` = 2_17, ``manylinux2010`` = 2_12, ``manylinux1`` = 2_5)."""
    found = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not found:
        return [platform]
    glibc, arch = int(found.group(1)), found.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for minor, name in legacy.items() if minor <= glibc]


def dry_run(requirements: list[str], extra: list[str]) -> list[dict]:
    """pip's dry-run install report (its ``install`` list) for ``requirements`` under constraints.txt."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), "-c", str(REPO / "constraints.txt"), *extra, *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"does not resolve: {' '.join(command)}\n{done.stderr.strip()[-3000:]}")
        return json.loads(report.read_text())["install"]


def unpinned(installed: list[dict], pinned: dict[str, str]) -> list[str]:
    """What the resolver chose that constraints.txt does not pin at that version."""
    chosen = {_name(item["metadata"]["name"]): item["metadata"]["version"] for item in installed}
    return sorted(f"{name}=={version} (pinned: {pinned.get(name, 'no pin')})" for name, version in chosen.items()
                  if pinned.get(name) != version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.11", help="the nodes' Python (scripts/node_setup.sh)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64", help="the nodes' wheel platform")
    args = parser.parse_args()

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins(REPO / "constraints.txt")
    binary = [req for req in project["dependencies"] if _name(req) not in SOURCE_BUILT]
    tags = [option for tag in platforms(args.platform) for option in ("--platform", tag)]
    installed = dry_run(binary, ["--only-binary=:all:", "--python-version", args.python_version, *tags])
    wrong = unpinned(installed, pinned)
    if wrong:
        print(f"resolved, but not at the pins of constraints.txt: {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"[resolve-check] {len(installed)} wheels resolve at their pins for Python {args.python_version} on "
          f"{args.platform} (all runtime dependencies but {', '.join(sorted(SOURCE_BUILT))})")

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != args.python_version:
        print(f"the source-built check needs Python {args.python_version} (this is {here}): run it with that "
              "interpreter", file=sys.stderr)
        return 1
    source = [f"{name}=={pinned[name]}" for name in sorted(SOURCE_BUILT)]
    installed = dry_run(source, [])
    wrong = unpinned(installed, pinned)
    if wrong:
        print(f"resolved, but not at the pins of constraints.txt: {', '.join(wrong)}", file=sys.stderr)
        return 1
    built = [item["metadata"]["name"] for item in installed if not item["download_info"]["url"].endswith(".whl")]
    print(f"[resolve-check] {', '.join(source)} resolve from source on Python {here}: the sdist's build "
          f"requirements and {len(installed)} packages, {len(built)} built from source ({', '.join(sorted(built))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
