#!/usr/bin/env bash
# The prepared GPU check, one command for a bare lent GPU machine (Python 3.12, torch >= 2.11, torchvision, numpy,
# numba; no Ray, MLflow, FFCV or kornia needed): at most 6 minutes on one H200, torch.compile of ResNet-50 included.
#
#   bash bench/device_check.sh            # writes under $OUT (else bench/results/latest/):
#     env.txt                             GPU, driver, torch, commit
#     gpu_throughput.json / .md           bench/gpu_throughput.py: the step, MFU, syncs, augmentation, probes, memory
#     augment.txt                         bench/augment.py --device cuda: launches, bytes, time / normalisation
#
# Copy the .md and .json into bench/results/ as <date>-<device>-<commit>.{md,json} and quote them in the README.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results/latest}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} | tee "$out/env.txt"
timeout 240 python3 bench/gpu_throughput.py --device cuda --out "$out" 2>&1 | tee "$out/gpu_throughput.log" || echo "gpu_throughput.py failed: $?"
timeout 100 python3 bench/augment.py --device cuda 2>&1 | tee "$out/augment.txt" || echo "augment.py failed: $?"
