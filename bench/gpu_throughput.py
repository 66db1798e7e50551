"""The engine's training step and final evaluation on one GPU, as the shipped configs run them: images/s, MFU, host
syncs, memory, augmentation, probe and feature-extraction costs (no Ray, MLflow, FFCV or kornia: the import path is
the engine's, so the lent GPU machine runs it with torch, torchvision, numpy and numba).

    python bench/gpu_throughput.py [--device cuda] [--steps 20] [--compile auto] [--out DIR]
    python bench/gpu_throughput.py --device cpu --smoke          # CPU smoke: every line, ResNet-18, tiny sizes

Cases: ``configs/imagenet1k_resnet50.yaml`` (ResNet-50, 224 px, LARS) and ``configs/cifar100_resnet50.yaml``
(CIFAR-stem ResNet-50, 32 px, SGD), each at one GPU's share of its global batch (global / ``ray.num_workers``),
under the config's precision (bf16 autocast on GPU), channels-last. Per case:

- real step: ``engine.train_one_epoch`` over uint8 two-view batches in pageable host memory, as the FFCV loader
  yields them (the staged copy, the colour augmentation, two views through encoder and head, the float32 loss,
  backward, optimiser and schedule); model-only step: the same model, loss and optimiser on float images already on
  the device. Both eager and, with ``--compile`` (auto: GPU, 224 px case), under ``torch.compile`` of the model.
- MFU = model FLOPs per image (``torch.utils.flop_counter``, forward + backward) x real images/s / ``--peak-tflops``
  (H100/H200 SXM dense bf16: 989).
- host syncs per step: steps after the first run under ``torch.cuda.set_sync_debug_mode("warn")``; its warnings
  are counted (0 is the goal: nothing in a step waits for the host).
- colour augmentation ms per view: normalisation alone, the masked version this replaced, the eager and the
  compiled one (``bench/augment.py``; the smoke leaves out the compiled one, which ``tests/test_augment.py`` covers).
- feature extraction images/s (``evaluation.extract_features``, eval batch 512) and the reference probe's step at
  its per-GPU batch (``probes.reference_probe``: frozen forward + linear step), with their host syncs.
Writes ``gpu_throughput.json`` and ``gpu_throughput.md`` under ``--out`` (default ``$OUT`` or the working folder).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import augment as augment_bench
from pipeline import checkpoint, engine, evaluation, probes
from pipeline.config import load_config
from pipeline.data.augment import ColorAugment
from pipeline.losses import build_loss
from pipeline.models import build_model, unwrap
from pipeline.record import RunRecord

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Case:
    name: str
    config_file: str
    classes: int


CASES = (Case("imagenet1k-resnet50-224px", "configs/imagenet1k_resnet50.yaml", 1000),
         Case("cifar100-resnet50-32px", "configs/cifar100_resnet50.yaml", 100))


def case_config(case: Case, smoke: bool):
    """The case's config at one GPU's share of its global batch (smoke: ResNet-18, batches of 4 at 32 px)."""
    config = load_config(ROOT / case.config_file)
    per_gpu = config.optim.global_batch_size // config.ray.num_workers
    overrides = ["ray.num_workers=1", f"optim.global_batch_size={4 if smoke else per_gpu}"]
    smoke_overrides = ["data.image_size=32", "eval.reference_probe_batch_per_worker=4", "model.encoder=resnet18"]
    return load_config(ROOT / case.config_file, overrides + (smoke_overrides if smoke else []))


def loader_batches(count: int, batch: int, size: int, classes: int, distinct: int = 4) -> list:
    """``count`` batches ``(view1, view2, labels, index)`` as the FFCV loader yields them: uint8 ``[n, 3, S, S]``
    channels-last views in pageable host memory (``distinct`` different ones, repeated)."""
    gen = torch.Generator().manual_seed(0)

    def view():
        return torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)

    made = [(view(), view(), torch.randint(0, classes, (batch,), generator=gen), torch.arange(batch) + k * batch)
            for k in range(min(count, distinct))]
    return [made[k % len(made)] for k in range(count)]


class Parts:
    """The engine's pieces for one config, as ``engine.build_training`` makes them (without data)."""

    def __init__(self, config, classes: int, device: torch.device, compile_model: bool = False) -> None:
        self.config, self.classes, self.device = config, classes, device
        self.model = build_model(config, classes).to(device, memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.optimizer = engine.build_optimizer(self.model, config.optim)
        self.scheduler = engine.warmup_cosine(self.optimizer, 0, 10_000, 1_000)
        d = config.data
        self.augment = ColorAugment(MEAN, STD, d.color_jitter_strength, d.color_jitter_prob, d.grayscale_prob,
                                    seed=0).to(device)
        self.preprocess = ColorAugment(MEAN, STD).to(device)
        self.loss_fn = build_loss(config.loss, classes)
        self.amp = engine.autocast_dtype(config.optim.precision, device)

    def epoch(self, batches, epoch: int = 1) -> dict:
        return engine.train_one_epoch(self.step_model, batches, self.augment, self.loss_fn, self.optimizer,
                                      self.scheduler, self.device, self.amp, epoch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def sync_warnings(device: torch.device, caught: list):
    """Inside: CUDA warns on every synchronising call; the warnings are appended to ``caught``."""
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    caught.extend(w for w in recorded if "synchroniz" in str(w.message).lower())


def counted_steps(batches: list, device: torch.device, caught: list):
    """Yields ``batches``; the steps from the second to the last run under sync warnings (the epoch's summary,
    read after the last step, is not a step)."""
    yield batches[0]
    with sync_warnings(device, caught):
        yield from batches[1:]


def timed(device: torch.device, run) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def real_steps(parts: Parts, batches: list) -> dict:
    """images/s, host syncs per step and peak GiB of ``train_one_epoch`` over ``batches``."""
    device = parts.device
    parts.epoch(batches[:3])  # warm-up: cuDNN's autotuning, the allocator, compilation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    caught: list = []
    elapsed = timed(device, lambda: parts.epoch(counted_steps(batches, device, caught)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": len(batches) * batches[0][0].shape[0] / elapsed,
            "syncs_per_step": len(caught) / (len(batches) - 1), "peak_gib": peak,
            "sync_sites": sorted({f"{w.filename}:{w.lineno}" for w in caught})[:5]}


def model_only_steps(parts: Parts, batch: int, size: int, classes: int, steps: int) -> dict:
    """images/s and FLOPs per image of the model, loss and optimiser on float images already on the device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = parts.device
    x = torch.randn(2 * batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device).repeat(2)

    def step() -> None:
        with torch.autocast(device.type, dtype=parts.amp or torch.float32, enabled=parts.amp is not None):
            z = parts.step_model(x)
        loss, _ = parts.loss_fn(z, labels)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()

    with FlopCounterMode(display=False) as counter:  # eager model: the compiled one hides its operators
        with torch.autocast(device.type, dtype=parts.amp or torch.float32, enabled=parts.amp is not None):
            z = parts.model(x)
        parts.loss_fn(z, labels)[0].backward()
    step()
    step()
    elapsed = timed(device, lambda: [step() for _ in range(steps)])
    return {"images_per_s": steps * batch / elapsed, "flops_per_image": counter.get_total_flops() / batch}


def feature_extraction(parts: Parts, size: int, classes: int, batches: int, batch: int = 512) -> dict:
    """images/s and host syncs of ``evaluation.extract_features`` (the frozen encoder, eval batch ``batch``)."""
    device, encoder = parts.device, unwrap(parts.model)
    data = [(v1, y, i) for v1, _, y, i in loader_batches(batches, batch, size, classes)]
    encoder.eval()
    evaluation.extract_features(encoder.features, data[:1], batch, parts.preprocess, device, parts.amp)
    caught: list = []
    with sync_warnings(device, caught):
        elapsed = timed(device, lambda: evaluation.extract_features(encoder.features, data, len(data) * batch,
                                                                   parts.preprocess, device, parts.amp))
    encoder.train()
    return {"images_per_s": len(data) * batch / elapsed, "syncs": len(caught)}


def reference_probe_step(parts: Parts, size: int, classes: int, steps: int) -> dict:
    """ms per step and images/s of ``probes.reference_probe`` (one epoch of ``steps`` steps at the config's
    per-GPU probe batch; the epoch's evaluation is on 64 samples), and its host syncs per step."""
    e, device, encoder = parts.config.eval, parts.device, unwrap(parts.model)
    batch = e.reference_probe_batch_per_worker
    data = loader_batches(steps, batch, size, classes)
    dim = encoder.features(torch.zeros(2, 3, size, size, device=device)).shape[1]
    held = {"val": evaluation.Shard.whole(torch.randn(64, dim, device=device),
                                          torch.randint(0, classes, (64,), device=device))}
    encoder.eval()

    def probe(batches) -> None:
        probes.reference_probe(encoder.features, batches, parts.preprocess, device, parts.amp, held, classes,
                                   epochs=1, lr=e.reference_probe_lr)

    probe(data[:2])
    caught: list = []
    with sync_warnings(device, caught):
        elapsed = timed(device, lambda: probe(data))
    # each call captures its CUDA graph and scores its epoch once: the difference of a long and a short call
    # leaves the steps alone
    short = min(timed(device, lambda: probe(data[:2])) for _ in range(2))
    encoder.train()
    per_step = max(elapsed - short, 1e-9) / (steps - 2)
    return {"batch": batch, "ms_per_step": 1e3 * per_step, "images_per_s": batch / per_step,
            "call_s": elapsed, "syncs_per_step": len(caught) / steps}


def checkpoint_round_trip(parts: Parts) -> float:
    """max |w - w_restored| after a checkpoint of ``parts`` is saved, loaded and restored into a fresh model."""
    class Loader:
        epoch = 1

    def training(p: Parts) -> engine.Training:
        return engine.Training(p.model, p.loss_fn, p.optimizer, p.scheduler, p.augment, p.preprocess, Loader(),
                               p.amp)

    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(folder, checkpoint.capture(training(parts), 1, {}), RunRecord("bench", "bench", ""))
        state = checkpoint.load(folder)
    fresh = Parts(parts.config, parts.classes, parts.device)
    checkpoint.restore(training(fresh), state)
    return max((a - b).abs().max().item() for a, b in zip(parts.model.state_dict().values(),
                                                         fresh.model.state_dict().values()) if a.is_floating_point())


def run_case(case: Case, device: torch.device, steps: int, compile_model: bool, smoke: bool) -> dict:
    config = case_config(case, smoke)
    batch, size = config.optim.global_batch_size, config.data.image_size
    parts = Parts(config, case.classes, device)
    batches = loader_batches(steps, batch, size, case.classes)
    result = {"config": case.config_file, "per_gpu_batch": batch, "image_size": size,
              "optimizer": config.optim.optimizer, "autocast": str(parts.amp or torch.float32),
              "real": real_steps(parts, batches), "model_only": model_only_steps(parts, batch, size, case.classes,
                                                                                  steps)}
    result["real_over_model_only"] = result["real"]["images_per_s"] / result["model_only"]["images_per_s"]
    if compile_model:
        compiled = Parts(config, case.classes, device, compile_model=True)
        began = time.perf_counter()
        compiled.epoch(batches[:1])
        result["compile_s"] = time.perf_counter() - began
        result["compiled_real"] = real_steps(compiled, batches)
        result["compiled_model_only"] = model_only_steps(compiled, batch, size, case.classes, steps)
        result["compiled_real_over_model_only"] = (result["compiled_real"]["images_per_s"]
                                                   / result["compiled_model_only"]["images_per_s"])
        del compiled
    variants = [v for v in ("normalise", *augment_bench.VARIANTS) if not (smoke and v == "compiled")]
    result["augment_ms_per_view"] = {variant: augment_bench.ms_per_view(device, size, batch, variant)
                                     for variant in variants}
    result["feature_extraction"] = feature_extraction(parts, size, case.classes, 2 if smoke else 8,
                                                      8 if smoke else 512)
    result["reference_probe"] = reference_probe_step(parts, size, case.classes, 4 if smoke else steps)
    result["checkpoint_round_trip_max_abs"] = checkpoint_round_trip(parts)
    return result


def mfu(result: dict, key: str, peak_tflops: float) -> float:
    return result["model_only"]["flops_per_image"] * result[key]["images_per_s"] / (peak_tflops * 1e12)


def markdown(report: dict) -> str:
    """The report as a markdown table, one column per case."""
    cases = report["cases"]
    rows = [("per-GPU batch", lambda r: f"{r['per_gpu_batch']} ({r['optimizer']}, {r['autocast']})"),
            ("real step images/s (eager)", lambda r: f"{r['real']['images_per_s']:.0f}"),
            ("model-only images/s (eager)", lambda r: f"{r['model_only']['images_per_s']:.0f}"),
            ("real / model-only (eager)", lambda r: f"{r['real_over_model_only']:.2f}"),
            ("MFU (real, eager)", lambda r: f"{r['mfu']:.3f}"),
            ("host syncs per step (eager)", lambda r: f"{r['real']['syncs_per_step']:.2f}"),
            ("peak GiB (eager)", lambda r: f"{r['real']['peak_gib']:.1f}"),
            ("torch.compile: compile s", lambda r: f"{r['compile_s']:.0f}" if "compile_s" in r else "-"),
            ("real images/s (compiled)", lambda r: f"{r['compiled_real']['images_per_s']:.0f}"
             if "compiled_real" in r else "-"),
            ("model-only images/s (compiled)", lambda r: f"{r['compiled_model_only']['images_per_s']:.0f}"
             if "compiled_real" in r else "-"),
            ("real / model-only (compiled)", lambda r: f"{r['compiled_real_over_model_only']:.2f}"
             if "compiled_real" in r else "-"),
            ("host syncs per step (compiled)", lambda r: f"{r['compiled_real']['syncs_per_step']:.2f}"
             if "compiled_real" in r else "-"),
            ("augmentation ms/view: " + " / ".join(next(iter(cases.values()))["augment_ms_per_view"]),
             lambda r: " / ".join(f"{v:.2f}" for v in r["augment_ms_per_view"].values())),
            ("feature extraction images/s", lambda r: f"{r['feature_extraction']['images_per_s']:.0f}"),
            ("reference probe: ms per step (batch)", lambda r: f"{r['reference_probe']['ms_per_step']:.1f} "
             f"({r['reference_probe']['batch']})"),
            ("reference probe: syncs per step", lambda r: f"{r['reference_probe']['syncs_per_step']:.2f}")]
    lines = [f"device {report['device']}, torch {report['torch']}, commit {report['commit']}, {report['date']}", "",
             "| | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in cases.values()) + " |" for label, cell in rows]
    return "\n".join(lines) + "\n"


def commit() -> str:
    """The checkout's commit (a ``+`` when the tree differs from it), or ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the model too (auto: on GPU, for the 224 px case)")
    parser.add_argument("--smoke", action="store_true", help="tiny batches at 32 px: checks every line on a CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cases", default=",".join(case.name for case in CASES),
                        help="comma-separated case names (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = 3 if args.smoke else args.steps
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "peak_tflops": args.peak_tflops, "cases": {}}
    for case in (case for case in CASES if case.name in args.cases.split(",")):
        compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda"
                                                 and case is CASES[0])
        result = run_case(case, device, steps, compile_model, args.smoke)
        result["mfu"] = mfu(result, "real", args.peak_tflops)
        if "compiled_real" in result:
            result["compiled_mfu"] = mfu(result, "compiled_real", args.peak_tflops)
        report["cases"][case.name] = result
        print(json.dumps({case.name: result}), flush=True)
        write(report, Path(args.out))  # after each case: a timeout later keeps what was measured
    print(markdown(report))


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_throughput.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
