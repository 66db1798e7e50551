"""The GPU check runs where the lent GPU machine is: its Python has torch, torchvision, numpy and numba but no Ray,
MLflow, FFCV or kornia. ``bench/gpu_throughput.py --smoke`` runs here with those four blocked from import, and
writes every figure the device check reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

from services import patience

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("ray", "mlflow", "ffcv", "kornia")

RUN_BLOCKED = f"""
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)")

sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
assert not {{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r})
"""


def test_gpu_check_runs_without_ray_mlflow_ffcv_and_kornia(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RUN_BLOCKED, str(ROOT / "bench" / "gpu_throughput.py"),
                           "--device", "cpu", "--smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=patience(600))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert set(report["cases"]) == {"imagenet1k-resnet50-224px", "cifar100-resnet50-32px"}
    for case in report["cases"].values():
        assert case["real"]["images_per_s"] > 0 and case["model_only"]["flops_per_image"] > 0
        assert all(ms > 0 for ms in case["augment_ms_per_view"].values())
        assert case["feature_extraction"]["images_per_s"] > 0 and case["reference_probe"]["ms_per_step"] > 0
        assert case["checkpoint_round_trip_max_abs"] == 0.0
    assert report["cases"]["imagenet1k-resnet50-224px"]["optimizer"] == "lars"
    table = (tmp_path / "gpu_throughput.md").read_text()
    assert "real / model-only (eager)" in table and report["torch"] in table
