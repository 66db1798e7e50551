"""Training-step throughput, model-FLOPs utilisation and host syncs of VarCon on one GPU (no Ray, no FFCV).

    python bench/gpu_throughput.py [--device cuda] [--steps 30] [--peak-tflops 989]

Data already on the device (random images: loading is measured by bench/loader.py). One step = two views of a
batch through the encoder and head under bf16 autocast, channels-last, the float32 VarCon loss, backward and
an SGD step. Cases: ResNet-50 at 224 px (batch 256) and CIFAR ResNet-50 at 32 px (batch 1024). FLOPs per step
come from ``torch.utils.flop_counter`` (forward + backward), MFU = achieved FLOP/s / peak (H100 SXM dense bf16:
989 TFLOP/s). Host syncs: the timed steps run under ``torch.cuda.set_sync_debug_mode("error")``, so any sync
aborts the case and is reported. The last line estimates the 200-epoch CIFAR-100 recipe's wall time.
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.losses import VarConLoss
from pipeline.models import ContrastiveModel, build_encoder

CASES = (("resnet50-224px", False, 224, 256, 1000), ("cifar-resnet50-32px", True, 32, 1024, 100))


def run_case(device: torch.device, cifar_stem: bool, size: int, batch: int, classes: int, steps: int,
             compile_model: bool) -> tuple[float, float, int]:
    """Returns (images/s, FLOPs per step, host syncs seen)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder, dim = build_encoder("resnet50", cifar_stem=cifar_stem)
    model = ContrastiveModel(encoder, dim, 2048, 128).to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = VarConLoss(0.1, 0.02, num_classes=classes)
    x = torch.randn(2 * batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device).repeat(2)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z = step_model(x)
        loss, _ = loss_fn(z, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    syncs = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    start = time.perf_counter()
    try:
        for _ in range(steps):
            step()
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        syncs = 1
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return steps * batch / elapsed, flops, syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="batch multiplier (e.g. 0.01 for a CPU smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} torch={torch.__version__}")
    print(f"{'case':>20} {'batch':>6} {'images/s':>10} {'TFLOP/step':>11} {'MFU':>7} {'host syncs':>11}")
    rate = {}
    for name, cifar_stem, size, batch, classes in CASES:
        batch = max(2, int(batch * args.scale))
        images_per_s, flops, syncs = run_case(device, cifar_stem, size, batch, classes, args.steps, args.compile)
        mfu = flops * images_per_s / batch / (args.peak_tflops * 1e12)
        rate[name] = images_per_s
        print(f"{name:>20} {batch:>6} {images_per_s:>10.0f} {flops / 1e12:>11.3f} {mfu:>7.3f} "
              f"{'>0' if syncs else '0':>11}", flush=True)
    minutes = 50_000 * 200 / rate["cifar-resnet50-32px"] / 60
    print(f"estimated 200-epoch CIFAR-100 ResNet-50 wall time on this device: {minutes:.1f} min")


if __name__ == "__main__":
    main()
