"""What one ask for a preemption notice costs a training step (``ray.preemption_check_steps``), by worker count.

Every rank calls Ray Train's ``get_preemption_info`` at the same steps: a collective (rank 0's answer broadcast
through Ray's synchronization actor), so each ask waits for every worker. Measured here in a ``TorchTrainer`` of
``--workers`` CPU workers (0.1 CPU each, so that 4 fit on 2 cores): ``--asks`` asks per worker, timed on rank 0,
median per ask; worker counts interleaved over ``--repeats`` runs. The cost at 32 workers is extrapolated
linearly from the largest two counts measured (the broadcast gathers one message per worker), and set against a
step of the ImageNet job (a global batch of 4,096 on 32 GPUs: 128 images per GPU, 52 ms at the H200 model-only
rate of ``bench/results/2026-12-04-h200-gpu_throughput-bc46e1e.md``, 2,445 img/s).

    python bench/preemption_check.py [--workers 1 2 4] [--asks 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

STEP_S = 128 / 2445  # one ImageNet step per GPU (H200 model-only figure, see the docstring)


def ask_loop(config: dict) -> None:
    import ray.train

    times = []
    for _ in range(config["asks"]):
        started = time.perf_counter()
        ray.train.get_preemption_info()
        times.append(time.perf_counter() - started)
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as handle:
            handle.write(str(statistics.median(times[10:])))  # after the first few (actor warm-up)


def measure(workers: int, asks: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/median"
        TorchTrainer(ask_loop, train_loop_config={"asks": asks, "out": out},
                     scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.1}),
                     run_config=RunConfig(storage_path=folder, name="asks")).fit()
        return float(open(out).read())


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--asks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", log_to_driver=False, include_dashboard=False)
    times = {n: [] for n in args.workers}
    for _ in range(args.repeats):
        for n in args.workers:
            times[n].append(measure(n, args.asks))
    medians = {n: statistics.median(values) for n, values in times.items()}
    print(f"get_preemption_info, median per ask on rank 0 ({args.asks} asks, {args.repeats} interleaved runs):")
    for n, value in medians.items():
        print(f"  {n:>2} workers  {value * 1e3:6.2f} ms   (runs: {', '.join(f'{v * 1e3:.2f}' for v in times[n])})")
    a, b = sorted(medians)[-2:]
    slope = (medians[b] - medians[a]) / (b - a)
    at_32 = medians[b] + slope * (32 - b)
    print(f"  32 workers  {at_32 * 1e3:6.2f} ms   (extrapolated from {a} and {b} workers)")
    for every in (50, 200, 1000):
        print(f"  every {every:>4} steps of {STEP_S * 1e3:.0f} ms at 32 workers: {at_32 / (every * STEP_S):.2%} of "
              f"training; a notice waits at most {every * STEP_S:.0f} s for its checkpoint")


if __name__ == "__main__":
    main()
