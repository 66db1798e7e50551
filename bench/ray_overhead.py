"""Per-epoch training time under Ray Train vs the same engine loop in plain processes, side by side in one run.

    python bench/ray_overhead.py [--epochs 5] [--repeats 3]

The digits default, evaluation off during training, 1 thread per worker. "plain" runs ``engine.fit`` in one
process (1 worker) or in 2 processes joined by a gloo process group with DDP (2 workers), no Ray, in a fresh
interpreter (processes spawned after ``ray.init`` hung in their gloo rendezvous here); "ray" runs the same config
through ``ray_train.run_training`` (Ray Train V2, TorchTrainer) in this driver. Epoch time is the engine's
``epoch_time_s`` (the step loop: loading, augmentation, forward, gather, backward, all-reduce); per run the median
over the epochs after the first. Plain and Ray runs alternate, ``--repeats`` times for each worker count; the last
lines give the median ratio and its spread (min-max) over the repeats. Ray's start-up (worker group, placement)
is printed separately.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import engine
from pipeline.config import flatten, load_config, to_dict
from pipeline.data import PreparedDataset, prepare_dataset


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


def plain_epoch_times(workers: int, epochs: int, files: PreparedDataset) -> list[float]:
    """Run in a fresh interpreter (``--plain``): the epoch times of rank 0."""
    command = [sys.executable, __file__, "--plain", str(workers), "--epochs", str(epochs),
               "--files", json.dumps(files.as_dict())]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def _plain_main(workers: int, epochs: int, files: PreparedDataset) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_plain_rank, args=(workers, port, to_dict(bench_config(workers, epochs)), files, out), nprocs=workers)
    print(json.dumps(list(out["times"])))


def ray_epoch_times(workers: int, epochs: int, files: PreparedDataset, home: Path) -> tuple[list[float], float]:
    from dataclasses import replace

    from pipeline.identity import identity_digest
    from pipeline.ray_train import run_training
    from pipeline.tracking import create_run
    from pipeline.train_job import checkpoints_in
    from pipeline.worker import worker_argument

    config = bench_config(workers, epochs)
    key = f"bench-{workers}-{time.time_ns()}"
    run = create_run(f"sqlite:///{home / 'mlflow.db'}", "bench", key, key, flatten(config))
    start = time.perf_counter()
    argument = replace(worker_argument(config, files, run.run_id, key, identity_digest(config)),
                       tracking_uri=run.tracking_uri)
    run_training(config, argument, key, str(home / "ray"))
    wall = time.perf_counter() - start
    record = checkpoints_in(home / "ray" / key)[-1].record
    times = [value for _, value in record.history()["epoch_time_s"]]
    return times[1:], wall - sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--files", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        return _plain_main(args.plain, args.epochs, PreparedDataset.from_dict(json.loads(args.files)))
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        files = prepare_dataset(bench_config(1, 2).data, home / "data", log=lambda *_: None)
        ray.init(num_cpus=2, log_to_driver=False)
        print(f"{'repeat':>6} {'workers':>8} {'plain s/epoch':>14} {'ray s/epoch':>12} {'ratio':>7} "
              f"{'ray start-up+eval s':>20}")
        ratios: dict[int, list[float]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                plain = statistics.median(plain_epoch_times(workers, args.epochs, files)[1:])
                ray_times, overhead = ray_epoch_times(workers, args.epochs, files, home)
                ratios[workers].append(statistics.median(ray_times) / plain)
                print(f"{repeat + 1:>6} {workers:>8} {plain:>14.3f} {statistics.median(ray_times):>12.3f} "
                      f"{ratios[workers][-1]:>7.3f} {overhead:>20.1f}", flush=True)
        ray.shutdown()
    for workers, values in ratios.items():
        print(f"ray/plain epoch time ratio ({workers} worker{'s' if workers > 1 else ''}): "
              f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, {len(values)} repeats)")


if __name__ == "__main__":
    sys.exit(main())
