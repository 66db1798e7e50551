"""A node's start-up check (``python -m pipeline.node_check``, the last step of ``scripts/node_setup.sh``): is the
NVIDIA driver new enough for the CUDA build of the installed torch? One line and exit 1 where it is not, so that
``ray up`` stops on that node instead of its first training failing with a CUDA initialisation error; nothing
on a node without an NVIDIA driver (CPU nodes, the head) or with a CPU build of torch.

Minimum drivers: NVIDIA's CUDA minor-version compatibility (docs.nvidia.com/deploy/cuda-compatibility: a toolkit
of major 13 runs on drivers >= 580, 12 on >= 525, 11 on >= 450, Linux).
"""
from __future__ import annotations

import subprocess
import sys

MINIMUM_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580"}  # CUDA major -> Linux driver


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split("."))


def driver_problem(torch_cuda: str | None, driver: str | None) -> str | None:
    """The one line to print when ``driver`` (``nvidia-smi``'s driver_version, e.g. ``"570.86.15"``) is too old for
    a torch built against CUDA ``torch_cuda`` (``torch.version.cuda``, e.g. ``"13.0"``); None when it is not, or when
    either is absent (no GPU driver, a CPU build)."""
    if not torch_cuda or not driver:
        return None
    known = [major for major in MINIMUM_DRIVER if major <= _version(torch_cuda)[0]]
    if not known:
        return None
    needed = MINIMUM_DRIVER[max(known)]  # a CUDA major newer than the table needs at least its newest entry
    if _version(driver) >= _version(needed):
        return None
    return (f"NVIDIA driver {driver} is too old for torch's CUDA {torch_cuda} build (it needs >= {needed}): use an "
            f"image with a newer driver (cluster.yaml's ImageId) or install one, then run `ray up` again")


def installed_driver() -> str | None:
    """The driver version ``nvidia-smi`` reports for the first GPU; None without an NVIDIA driver."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def main() -> int:
    import torch

    problem = driver_problem(torch.version.cuda, installed_driver())
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
