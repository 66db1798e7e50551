"""Forward+backward time of VarCon vs SupCon, measured side by side in one run.

    python bench/losses.py [--device cpu|cuda] [--repeats 7]

For N views (D=128) and C classes: median time of loss(z, labels) + backward over --repeats runs after two
warm-up runs, for both losses on the same inputs. The last line is the ratio at N=2048, C=100.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.losses import SupConLoss, VarConLoss

SIZES = (512, 2048, 4096)
CLASS_COUNTS = (10, 100, 1000)
DIM = 128


def time_fwd_bwd(loss_fn, z: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of one forward and backward."""
    leaf = z.detach().requires_grad_()
    if z.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = loss_fn(leaf, labels)
    loss.backward()
    if z.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(first, second, z: torch.Tensor, labels: torch.Tensor, repeats: int):
    """Median seconds of each and the per-repeat ratios first/second, the two timed alternately after two
    warm-up calls each."""
    for _ in range(2):
        time_fwd_bwd(first, z, labels), time_fwd_bwd(second, z, labels)
    pairs = [(time_fwd_bwd(first, z, labels), time_fwd_bwd(second, z, labels)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs), [a / b for a, b in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} D={DIM} repeats={args.repeats} (median fwd+bwd)")
    print(f"{'N':>6} {'C':>6} {'varcon ms':>10} {'supcon ms':>10} {'ratio':>7} {'spread':>13}")
    ratios = {}
    for n in SIZES:
        z = F.normalize(torch.randn(n, DIM, generator=gen), dim=1).to(device)
        for c in CLASS_COUNTS:
            labels = torch.randint(0, c, (n,), generator=gen).to(device)
            varcon, supcon, per_repeat = interleaved(VarConLoss(0.1, 0.02, num_classes=c), SupConLoss(0.1, 0.07),
                                                     z, labels, args.repeats)
            ratios[n, c] = per_repeat
            print(f"{n:>6} {c:>6} {varcon * 1e3:>10.2f} {supcon * 1e3:>10.2f} {statistics.median(per_repeat):>7.3f} "
                  f"{min(per_repeat):>6.3f}-{max(per_repeat):.3f}", flush=True)
    chosen = ratios[2048, 100]
    print(f"varcon/supcon time ratio N=2048 C=100: {statistics.median(chosen):.3f} (min {min(chosen):.3f}, "
          f"max {max(chosen):.3f}, {len(chosen)} interleaved repeats)")


if __name__ == "__main__":
    main()
