"""Per-epoch training time under Ray Train vs the same engine loop in plain processes, side by side in one run.

    python bench/ray_overhead.py [--epochs 5]

The digits default, evaluation off during training, 1 thread per worker. "plain" runs ``engine.fit`` in one
process (1 worker) or in 2 processes joined by a gloo process group with DDP (2 workers), no Ray; "ray" runs
the same config through ``ray_train.run_training`` (Ray Train V2, TorchTrainer). Epoch time is the engine's
``epoch_time_s`` (the step loop: loading, augmentation, forward, gather, backward, all-reduce); the median over
the epochs after the first is compared. Ray's start-up (worker group, placement) is printed separately.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import engine
from pipeline.config import load_config, to_dict
from pipeline.data import prepare_datasets


def bench_config(workers: int, epochs: int):
    return load_config(None, [f"ray.num_workers={workers}", f"optim.epochs={epochs}", "optim.warmup_epochs=0",
                              "eval.every_epochs=1000", "eval.linear_probe_epochs=0", "eval.few_shot_episodes=0",
                              "name=ray-overhead"])


def _plain_rank(rank: int, world: int, port: int, raw_config: dict, files, out) -> None:
    from pipeline.config import from_dict

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    times = []
    wrap = (lambda m: torch.nn.parallel.DistributedDataParallel(m)) if world > 1 else (lambda m: m)
    engine.fit(from_dict(raw_config), files, torch.device("cpu"),
               lambda epoch, metrics, _: epoch and times.append(metrics["epoch_time_s"]), wrap_model=wrap)
    if rank == 0:
        out["times"] = times
    if world > 1:
        dist.destroy_process_group()


def plain_epoch_times(workers: int, epochs: int, files) -> list[float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_plain_rank, args=(workers, port, to_dict(bench_config(workers, epochs)), files, out), nprocs=workers)
    return list(out["times"])


def ray_epoch_times(workers: int, epochs: int, files, home: Path) -> tuple[list[float], float]:
    from pipeline.ray_train import run_training
    from pipeline.tracking import TrackedRun

    config = bench_config(workers, epochs)
    uri = f"sqlite:///{home / f'mlflow-{workers}.db'}"
    tracked, _ = TrackedRun.find_or_start(config, uri, run_key=f"bench-{workers}-{time.time()}")
    start = time.perf_counter()
    run_training(config, files, uri, tracked.run_id, f"bench-{workers}-{int(time.time())}")
    wall = time.perf_counter() - start
    times = [v for _, v in sorted(tracked.metric_history("epoch_time_s"))]
    return times[1:], wall - sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["VARCON_HOME"] = tmp
        files = prepare_datasets(bench_config(1, 2).data, home / "data", log=lambda *_: None)
        # Plain runs first: processes spawned after ray.init in this driver hung in their gloo rendezvous here.
        plain = {workers: statistics.median(plain_epoch_times(workers, args.epochs, files)[1:]) for workers in (1, 2)}
        ray.init(num_cpus=2, log_to_driver=False)
        print(f"{'workers':>8} {'plain s/epoch':>14} {'ray s/epoch':>12} {'ratio':>7} {'ray start-up+eval s':>20}")
        ratio = {}
        for workers in (1, 2):
            ray_times, overhead = ray_epoch_times(workers, args.epochs, files, home)
            ratio[workers] = statistics.median(ray_times) / plain[workers]
            print(f"{workers:>8} {plain[workers]:>14.3f} {statistics.median(ray_times):>12.3f} {ratio[workers]:>7.3f} "
                  f"{overhead:>20.1f}", flush=True)
        ray.shutdown()
    print(f"ray/plain epoch time ratio (1 worker): {ratio[1]:.2f}")
    print(f"ray/plain epoch time ratio (2 workers): {ratio[2]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
