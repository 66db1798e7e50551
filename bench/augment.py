"""Colour augmentation side by side in one run: today's masked version ("before", ``bench/augment_before.py``), the
one-pass eager path and the compiled one (``pipeline.data.augment``), against normalisation alone (``(x / 255 -
mean) / std`` from uint8: the evaluation transform, 4 eager ops).

    python bench/augment.py [--device cpu|cuda] [--repeats 5]

ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 and grayscale p=0.2 on uint8 channels-last batches already on the device
(the loader's layout), the sample indices on the host (as the loader yields them); epoch and view change every call.
Cases: 32 px batch 256 and 224 px batch 32 (CPU) or 128 (CUDA: one GPU's share of the ImageNet config). Per variant:

- launches per call. Eager ("before", "eager", normalisation): aten ops dispatched on the device, counted with a
  ``TorchDispatchMode`` (views and allocations left out). Compiled: the kernels Inductor generated for the graph
  (``torch._inductor.metrics.generated_kernel_count`` over a fresh compilation: each runs once per call) plus, on
  CUDA, the copy of the seeded indices. On CUDA every variant is also counted by the profiler (device kernels and
  copies per call).
- bytes per image: eager, the bytes of each dispatched op's device tensors, inputs and outputs (a broadcast operand
  counted once); compiled, Inductor's estimate for the fresh compilation (each kernel's buffers read and written,
  ``GraphLowering.count_bytes``). Both / batch.
- time per call / normalisation's: the median over ``--repeats`` interleaved rounds of the per-round ratio, each
  round timing every variant over enough back-to-back calls (CUDA: events, synchronised at the end).
- max |output - before| over the case's batch, same draws, in [0, 1] units (before normalisation): the paths
  agree to float rounding.

``ms_per_view(device, size, batch, variant)`` is the timing alone, for ``bench/gpu_throughput.py``. Importing this
module has no side effect and needs only torch (no Ray, MLflow, FFCV or kornia).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):  # run as a script: the repository root on the path, for ``pipeline`` and ``bench``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.augment_before import ColorAugmentBefore  # noqa: E402
from pipeline.data.augment import ColorAugment  # noqa: E402

VARIANTS = ("before", "eager", "compiled")
NORMALISE = "normalise"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JITTER = (0.4, 0.8, 0.2)  # strength, jitter_prob, grayscale_prob: the shipped configs
CASES = {"cpu": ((32, 256), (224, 32)), "cuda": ((32, 256), (224, 128))}
NO_KERNEL = {"aten::empty.memory_format", "aten::empty_like", "aten::empty_strided", "aten::lift_fresh",
             "aten::_local_scalar_dense"}


def build(variant: str, device: torch.device) -> torch.nn.Module:
    """The module of ``variant`` ("before", "eager", "compiled" or "normalise") on ``device``."""
    if variant == NORMALISE:
        return ColorAugment(MEAN, STD, compile="off").to(device)
    if variant == "before":
        return ColorAugmentBefore(MEAN, STD, *JITTER).to(device)
    return ColorAugment(MEAN, STD, *JITTER, compile="on" if variant == "compiled" else "off").to(device)


def inputs(device: torch.device, size: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[batch, 3, size, size]`` channels-last on ``device`` and int64 indices ``[batch]`` on the host."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)
    return images.to(device), torch.arange(batch) * 3 + 1


class Calls:
    """``call()`` runs ``module`` once on the case's batch; epoch and view change every call (a compiled module
    must not recompile for them)."""

    def __init__(self, module: torch.nn.Module, images: torch.Tensor, index: torch.Tensor) -> None:
        self.module, self.images, self.index, self.count = module, images, index, 0

    def __call__(self) -> torch.Tensor:
        self.count += 1
        if not getattr(self.module, "random", True):
            return self.module(self.images)
        return self.module(self.images, self.count, self.index, view=self.count % 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(call, device: torch.device, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls (CUDA: events, after the queue is drained)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / calls
    began = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - began) / calls


def interleaved_seconds(calls_by_variant: dict, device: torch.device, repeats: int,
                        target_s: float = 0.05) -> dict[str, list[float]]:
    """Per variant, seconds per call in each of ``repeats`` rounds; a round times every variant in turn, each over
    enough calls to last about ``target_s`` (after two warm-up calls)."""
    counts = {}
    for variant, call in calls_by_variant.items():
        call(), call()
        counts[variant] = max(1, min(200, round(target_s / max(seconds_per_call(call, device, 1), 1e-6))))
    rounds: dict[str, list[float]] = {variant: [] for variant in calls_by_variant}
    for _ in range(repeats):
        for variant, call in calls_by_variant.items():
            rounds[variant].append(seconds_per_call(call, device, counts[variant]))
    return rounds


def ms_per_view(device, size: int, batch: int, variant: str, repeats: int = 5) -> float:
    """Median ms of one ``variant`` call ("before", "eager", "compiled" or "normalise") on a uint8 channels-last
    ``[batch, 3, size, size]`` batch on ``device`` (the compilation, if any, is done first and not timed)."""
    device = torch.device(device)
    images, index = inputs(device, size, batch)
    rounds = interleaved_seconds({variant: Calls(build(variant, device), images, index)}, device, repeats)
    return statistics.median(rounds[variant]) * 1000


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s distinct elements (a stride-0, broadcast dimension counted once)."""
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


class DeviceOps(TorchDispatchMode):
    """Counts the aten ops dispatched with a tensor on ``device`` (views and allocations left out) and the bytes of
    those tensors, inputs and outputs."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.launches, self.bytes = device, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.name() in NO_KERNEL:
            return out
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor) and t.device.type == self.device.type]
        if tensors:
            self.launches += 1
            self.bytes += sum(_tensor_bytes(t) for t in tensors)
        return out


def eager_counts(call, device: torch.device) -> tuple[int, int]:
    """(launches, bytes) of one eager call."""
    call()
    with DeviceOps(device) as ops:
        call()
    return ops.launches, ops.bytes


@contextlib.contextmanager
def inductor_metrics():
    """Inductor's per-compilation metrics on (``num_bytes_accessed`` is kept only with its log enabled; the log's
    records are dropped) and its caches off, so that the next compilation generates its kernels here."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor import metrics

    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    level, handler = log.level, logging.NullHandler()
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    caches = {"fx_graph_cache": False}
    autograd_cache = ({"enable_autograd_cache": False} if hasattr(functorch_config, "enable_autograd_cache")
                      else {})
    metrics.reset()
    try:
        with inductor_config.patch(caches), functorch_config.patch(autograd_cache):
            yield metrics
    finally:
        log.setLevel(level)
        log.removeHandler(handler)


def compiled_counts(call, device: torch.device) -> tuple[int, int, float]:
    """(launches, bytes, compile seconds) of the compiled call: its first call compiles here."""
    began = time.perf_counter()
    with inductor_metrics() as metrics:
        call()
        _sync(device)
        kernels, num_bytes = metrics.generated_kernel_count, metrics.num_bytes_accessed
    extra_launches = 1 if device.type == "cuda" else 0  # the seeded indices' copy to the device
    return kernels + extra_launches, num_bytes, time.perf_counter() - began


def profiled_launches(call, device: torch.device, calls: int = 5) -> float | None:
    """CUDA only: device kernels and copies per call, from the profiler."""
    if device.type != "cuda":
        return None
    call()
    _sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            call()
        _sync(device)
    return sum(1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA) / calls


def run_case(device: torch.device, size: int, batch: int, repeats: int) -> dict:
    """Every figure of one case, per variant (normalisation included); a variant that fails (e.g. no compiler on
    the machine) gets ``{"error": ...}`` and the others still run."""
    images, index = inputs(device, size, batch)
    calls = {variant: Calls(build(variant, device), images, index) for variant in (NORMALISE, *VARIANTS)}
    rows = {}
    for variant, call in list(calls.items()):
        try:
            row = {}
            if variant == "compiled":
                row["launches"], row["bytes"], row["compile_s"] = compiled_counts(call, device)
            else:
                row["launches"], row["bytes"] = eager_counts(call, device)
            row["profiled_launches"] = profiled_launches(call, device)
            rows[variant] = row
        except Exception as error:  # reported in the table
            rows[variant] = {"error": f"{type(error).__name__}: {error}"[:300]}
            del calls[variant]
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    outputs = {}
    for variant in VARIANTS:  # the same draws for every variant: epoch 1000, view 0
        if variant in calls:
            calls[variant].count = 999
            outputs[variant] = calls[variant]()
    for variant in outputs:  # in [0, 1] units: the normalised difference times std
        rows[variant]["max_abs_vs_before"] = ((outputs[variant] - outputs["before"]) * std).abs().max().item()
    rounds = interleaved_seconds(calls, device, repeats, target_s=0.05 if device.type == "cpu" else 0.02)
    for variant in calls:
        rows[variant]["ms"] = statistics.median(rounds[variant]) * 1000
        rows[variant]["time_ratio"] = statistics.median(t / n for t, n in zip(rounds[variant], rounds[NORMALISE]))
    return rows


def table(size: int, batch: int, rows: dict) -> str:
    norm = rows[NORMALISE]
    lines = [f"{size} px, batch {batch}",
             f"{'variant':<10} {'launches':>9} {'profiled':>9} {'MB/image':>9} {'x norm':>7} {'ms/call':>9} "
             f"{'x norm':>7} {'max|d|':>8} {'compile s':>9}"]
    for variant, row in rows.items():
        if "error" in row:
            lines.append(f"{variant:<10} failed: {row['error']}")
            continue
        profiled = "-" if row["profiled_launches"] is None else f"{row['profiled_launches']:.0f}"
        diff = f"{row['max_abs_vs_before']:.1e}" if "max_abs_vs_before" in row else "-"
        compile_s = f"{row['compile_s']:.0f}" if "compile_s" in row else "-"
        mb = row["bytes"] / batch / 1e6
        lines.append(f"{variant:<10} {row['launches']:>9} {profiled:>9} {mb:>9.2f} "
                     f"{row['bytes'] / norm['bytes']:>7.2f} {row['ms']:>9.3f} {row['time_ratio']:>7.2f} {diff:>8} "
                     f"{compile_s:>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device={device} ({name}) torch={torch.__version__} repeats={args.repeats} "
          f"(time: median of interleaved rounds; x norm: / normalisation alone)")
    for size, batch in CASES[device.type]:
        print(table(size, batch, run_case(device, size, batch, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
