"""The engine's own training step on one GPU: images/s, model-FLOP utilisation, host syncs, memory (no Ray, MLflow
or FFCV: the import path is the engine's, so the lent GPU machine runs it with torch, torchvision and numpy).

    python bench/gpu_throughput.py [--device cuda] [--steps 30] [--peak-tflops 989] [--scale 1.0]
    python bench/gpu_throughput.py --device cpu --scale 0.01 --steps 3     # CPU smoke: every line, tiny sizes

Input: pinned uint8 channels-last batches shaped like the FFCV loader's (two views, labels, sample indices).
"real step" is ``engine.train_one_epoch`` over them: the staged copy to the device, the colour augmentation
(``ColorAugment``: jitter p=0.8, grayscale p=0.2), the two views through ResNet-50 and the 2048-2048-128 head
under the run's precision (bf16 autocast on GPU), the float32 VarCon loss, backward of the world-size-scaled
loss (1 here) and the SGD step with its schedule. "model-only step" feeds already-augmented float images on the
device to the same model, loss and optimiser. FLOPs per step come from ``torch.utils.flop_counter`` (forward +
backward); MFU = achieved FLOP/s / ``--peak-tflops`` (H100/H200 SXM dense bf16: 989). Host syncs per step: the
real steps after the first run under ``torch.cuda.set_sync_debug_mode("warn")`` and its warnings are counted.
Cases: ResNet-50 at 224 px (batch 256) and CIFAR-stem ResNet-50 at 32 px (batch 1024). Then ratio lines (real /
model-only throughput; bf16 / fp32 feature extraction time) and a smoke of the real path: bf16, channels-last,
``torch.compile`` (GPU only), a checkpoint saved, loaded and restored into a fresh model.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from pipeline import checkpoint, engine
from pipeline.config import build_config
from pipeline.data.augment import ColorAugment
from pipeline.losses import build_loss
from pipeline.models import build_model, unwrap

CASES = (("resnet50-224px", False, 224, 256, 1000), ("cifar-resnet50-32px", True, 32, 1024, 100))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def case_config(cifar_stem: bool, size: int, batch: int, precision: str):
    return build_config({"model": {"encoder": "resnet50", "cifar_stem": cifar_stem, "head_hidden_dim": 2048},
                         "data": {"image_size": size},
                         "optim": {"global_batch_size": batch, "precision": precision, "lr": 0.05, "epochs": 10},
                         "ray": {"num_workers": 1}})


def loader_batches(count: int, batch: int, size: int, classes: int, pin: bool, distinct: int = 4) -> list:
    """``count`` batches ``(view1, view2, labels, index)``: uint8 ``[n, 3, S, S]`` channels-last views, as FFCV
    hands them over (``distinct`` different ones, repeated: host memory stays small)."""
    gen = torch.Generator().manual_seed(0)

    def view():
        images = torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8)
        return (images.pin_memory() if pin else images).permute(0, 3, 1, 2)

    made = [(view(), view(), torch.randint(0, classes, (batch,), generator=gen), torch.arange(batch) + k * batch)
            for k in range(min(count, distinct))]
    return [made[k % len(made)] for k in range(count)]


class Parts:
    """The engine's pieces for one case."""

    def __init__(self, config, classes: int, device: torch.device, compile_model: bool = False) -> None:
        self.model = build_model(config, classes).to(device, memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.optimizer = engine.build_optimizer(self.model, config.optim)
        self.scheduler = engine.warmup_cosine(self.optimizer, 0, 10_000, 1_000)
        self.augment = ColorAugment(MEAN, STD, 0.4, 0.8, 0.2, seed=0).to(device)
        self.loss_fn = build_loss(config.loss, classes)
        self.amp = engine.autocast_dtype(config.optim.precision, device)
        self.device = device

    def epoch(self, batches, epoch: int = 1) -> dict:
        return engine.train_one_epoch(self.step_model, batches, self.augment, self.loss_fn, self.optimizer,
                                      self.scheduler, self.device, self.amp, epoch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def counted_syncs(batches, device: torch.device, counter: list):
    """Yields ``batches``; from the second step on, CUDA warns on every synchronising call (counted)."""
    for k, batch in enumerate(batches):
        if k == 1 and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        yield batch
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    counter.append(len(batches) - 1)


def real_steps(parts: Parts, batches: list) -> tuple[float, float, float]:
    """(images/s, host syncs per step, peak GiB) of ``train_one_epoch`` over ``batches``."""
    device = parts.device
    parts.epoch(batches[:2])  # warm-up: cuDNN's autotuning, allocator, compilation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    counted: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        parts.epoch(counted_syncs(batches, device, counted))
        synchronize(device)
        elapsed = time.perf_counter() - start
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / max(1, counted[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return len(batches) * batches[0][0].shape[0] / elapsed, syncs, peak


def model_only_steps(parts: Parts, batch: int, size: int, classes: int, steps: int) -> tuple[float, float]:
    """(images/s, FLOPs per step) of the model, loss and optimiser on float images already on the device."""
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

    with FlopCounterMode(display=False) as counter:
        step()
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start), counter.get_total_flops()


def feature_time(parts: Parts, batch: int, size: int, dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Seconds per batch of encoder features in eval mode, under ``dtype`` autocast (None: float32)."""
    device, encoder = parts.device, unwrap(parts.model)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    encoder.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        encoder.features(x)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            encoder.features(x)
        synchronize(device)
    encoder.train()
    return (time.perf_counter() - start) / repeats


def smoke(device: torch.device, batch: int) -> str:
    """The real path once more, compiled on GPU, then a checkpoint saved, loaded and restored."""
    config = case_config(True, 32, batch, "auto")
    parts = Parts(config, 100, device, compile_model=device.type == "cuda")
    batches = loader_batches(3, batch, 32, 100, pin=device.type == "cuda")
    metrics = parts.epoch(batches)

    class Loader:
        epoch = 1

    training = engine.Training(parts.model, parts.loss_fn, parts.optimizer, parts.scheduler, parts.augment,
                               parts.augment, Loader(), parts.amp)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(folder, checkpoint.capture(training, 1, {}), checkpoint.RunRecord("smoke", "smoke", ""))
        state = checkpoint.load(folder)
    fresh = Parts(config, 100, device)
    restored = engine.Training(fresh.model, fresh.loss_fn, fresh.optimizer, fresh.scheduler, fresh.augment,
                               fresh.augment, Loader(), fresh.amp)
    checkpoint.restore(restored, state)
    gap = max((a - b).abs().max().item() for a, b in zip(parts.model.state_dict().values(),
                                                         fresh.model.state_dict().values()) if a.is_floating_point())
    return (f"smoke: {parts.amp or torch.float32} autocast, channels-last, "
            f"{'torch.compile' if device.type == 'cuda' else 'eager (compile: GPU only)'}, loss "
            f"{metrics['train_loss']:.3f}, checkpoint round trip max |w - w_restored| = {gap:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--scale", type=float, default=1.0, help="batch multiplier (0.01 for a CPU smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} torch={torch.__version__}")
    print(f"{'case':>20} {'batch':>6} {'real img/s':>11} {'model img/s':>12} {'TFLOP/step':>11} {'MFU':>6} "
          f"{'syncs/step':>11} {'peak GiB':>9}")
    ratios = {}
    for name, cifar_stem, size, batch, classes in CASES:
        batch = max(2, int(batch * args.scale))
        parts = Parts(case_config(cifar_stem, size, batch, "auto"), classes, device)
        real, syncs, peak = real_steps(parts, loader_batches(args.steps, batch, size, classes, device.type == "cuda"))
        model_only, flops = model_only_steps(parts, batch, size, classes, args.steps)
        mfu = flops * real / batch / (args.peak_tflops * 1e12)
        print(f"{name:>20} {batch:>6} {real:>11.0f} {model_only:>12.0f} {flops / 1e12:>11.3f} {mfu:>6.3f} "
              f"{syncs:>11.2f} {peak:>9.2f}", flush=True)
        bf16_time = feature_time(parts, batch, size, torch.bfloat16)
        ratios[name] = (real / model_only, bf16_time / feature_time(parts, batch, size, None), real)
    for name, (real_over_model, bf16_over_fp32, _) in ratios.items():
        print(f"real step / model-only step throughput ({name}): {real_over_model:.2f}")
        print(f"bf16 / fp32 feature extraction time ({name}): {bf16_over_fp32:.2f}")
    print(smoke(device, max(2, int(64 * args.scale))))
    minutes = 50_000 * 200 / ratios["cifar-resnet50-32px"][2] / 60
    print(f"estimated 200-epoch CIFAR-100 ResNet-50 wall time on this device (one GPU): {minutes:.1f} min")


if __name__ == "__main__":
    main()
