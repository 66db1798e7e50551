"""ASHA vs random search on synthetic learning curves (no training), and Ray Tune's bookkeeping cost.

    python bench/tune_efficiency.py [--configs 81] [--epochs 81] [--seed 0] [--repeats 3]

Every sampled configuration c has a saturating kNN-accuracy curve (a noisy ``acc_c(t) = top_c - gap_c *
exp(-t / speed_c)``, where slow starters can end on top, so curves cross). Random search trains every
configuration for every epoch; ASHA (Ray Tune's ``ASHAScheduler``, grace 1 epoch, reduction factor 3, the same
configurations through a grid over their index, 4 at a time) stops the weak ones early. Compute is counted in
epochs. Printed: each method's best final accuracy, ASHA's compute to reach random search's best (the epochs
all trials had run when the trial that reaches it finished) over random search's compute, and Tune's
bookkeeping time per reported result measured on this machine (the trainables only replay their curve, so the
ASHA sweep's wall time over its number of results is Tune's own cost). Repeated over the curves of several seeds:
the last lines give the median and the spread.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def curves(configs: int, epochs: int, seed: int) -> np.ndarray:
    """``[configs, epochs]`` accuracies after epochs 1..E."""
    rng = np.random.default_rng(seed)
    top = rng.uniform(0.55, 0.95, configs)
    speed = np.exp(rng.uniform(math.log(1.5), math.log(25.0), configs))
    speed = speed * (1.0 + 1.5 * (top - 0.55))  # the better configurations tend to start slower
    gap = rng.uniform(0.3, 0.5, configs)
    t = np.arange(1, epochs + 1)
    acc = top[:, None] - gap[:, None] * np.exp(-t[None, :] / speed[:, None])
    return np.clip(acc + rng.normal(0, 0.004, acc.shape), 0, 1)


def trainable(config: dict) -> None:
    from ray import tune

    for epoch, value in enumerate(config["curve"], start=1):
        tune.report({"acc": float(value), "epoch": epoch})


def one_sweep(configs: int, epochs: int, seed: int) -> tuple[float, float, float]:
    """ASHA's compute to random search's best over random search's compute, ASHA's whole compute over random
    search's, and Tune's milliseconds per reported result, for the curves of ``seed``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    acc = curves(configs, epochs, seed)
    random_best = acc[:, -1].max()
    random_compute = acc.size
    finished: list[tuple[float, int, float]] = []  # (time, epochs run, final accuracy) per trial

    class Record(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result
            finished.append((time.perf_counter(), int(result["epoch"]), float(result["acc"])))

    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        results = tune.Tuner(
            tune.with_resources(trainable, {"CPU": 1}),
            param_space={"curve": tune.grid_search([list(map(float, row)) for row in acc])},
            tune_config=tune.TuneConfig(metric="acc", mode="max", max_concurrent_trials=4, reuse_actors=True,
                                        scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs,
                                                                grace_period=1, reduction_factor=3)),
            run_config=tune.RunConfig(storage_path=storage, verbose=0, callbacks=[Record()]),
        ).fit()
        wall = time.perf_counter() - start
    reports = sum(int(r.metrics["epoch"]) for r in results)
    asha_best = max(r.metrics["acc"] for r in results if r.metrics["epoch"] == epochs)
    # compute ASHA had spent when a trial ending at random search's best (within noise) finished
    cumulative, to_best = 0, None
    for _, epochs_run, final in sorted(finished):
        cumulative += epochs_run
        if to_best is None and epochs_run == epochs and final >= random_best - 0.005:
            to_best = cumulative
    print(f"seed {seed}: random search {random_compute} epochs, best final accuracy {random_best:.4f}; ASHA "
          f"{reports} epochs ({reports / random_compute:.3f} of random's), best {asha_best:.4f} "
          f"({'matches' if to_best else 'misses'} random's best within 0.005); Tune {1000 * wall / reports:.1f} ms "
          f"per result", flush=True)
    return (to_best / random_compute if to_best else float("nan")), reports / random_compute, 1000 * wall / reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=81)
    parser.add_argument("--epochs", type=int, default=81)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="sweeps over the curves of seed, seed+1, ...")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs = [one_sweep(args.configs, args.epochs, args.seed + r) for r in range(args.repeats)]
    ray.shutdown()

    def summary(values: list[float], digits: int = 2) -> str:
        return (f"{statistics.median(values):.{digits}f} (min {min(values):.{digits}f}, "
                f"max {max(values):.{digits}f}, {len(values)} sweeps)")

    print(f"{args.configs} configurations x {args.epochs} epochs each")
    print(f"tune bookkeeping on this machine: {summary([ms for _, _, ms in runs], 1)} ms per result")
    print(f"asha/random whole compute: {summary([whole for _, whole, _ in runs])}")
    print(f"asha/random compute to best: {summary([to_best for to_best, _, _ in runs])}")


if __name__ == "__main__":
    main()
