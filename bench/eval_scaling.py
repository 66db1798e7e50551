"""Evaluation wall time sharded over 2 workers vs 1 worker, side by side in one run.

    python bench/eval_scaling.py [--repeats 3] [--passes 3] [--train-samples 12000]

One evaluation = what a training does after an epoch when the validation monitor is due
(``Evaluator.during``): centre-view features of the memory bank (train minus validation) and of the validation
split, then the sharded weighted kNN of every validation sample against the whole bank. Same data (a synthetic
dataset written once), same model (small_cnn, seed 0, untrained: the cost does not depend on the weights), FFCV
loaders built and compiled before timing. Configurations, each in fresh processes: 2 gloo workers x 1 thread,
1 worker x 1 thread, 1 worker x 2 threads; each times ``--passes`` evaluations after a warm-up pass and keeps
their median (the slowest rank's). The configurations alternate ``--repeats`` times; ratios are medians over
the repeats with their spread (min-max). Also printed: the bank shard each rank holds (features, norms, labels,
indices) against the whole bank a single process holds. The last line reads
``eval scaling (2 workers / 1 worker): R.RR``.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.data import prepare_dataset
from pipeline.data.augment import ColorAugment
from pipeline.data.prepare import dataset_splits
from pipeline.evaluator import Evaluator
from pipeline.models import build_model


def bench_config(workers: int, train_samples: int):
    return load_config(None, ["data.dataset=synthetic", "data.num_classes=20", f"data.train_samples={train_samples}",
                              f"data.test_samples={train_samples // 5}", "data.val_fraction=0.2",
                              f"ray.num_workers={workers}", "eval.every_epochs=1", "eval.knn_k=[20, 200]"])


def _rank(rank: int, world: int, threads: int, port: int, train_samples: int, files, passes: int, out) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    config = bench_config(world, train_samples)
    torch.manual_seed(0)
    model = build_model(config, files.num_classes).eval()
    preprocess = ColorAugment(files.channel_mean, files.channel_std)
    evaluator = Evaluator(config, files, dataset_splits(config.data, files))
    device = torch.device("cpu")
    evaluator.during(1, model, preprocess, device)  # warm-up: FFCV compiles its pipelines on first use
    times = []
    for _ in range(passes):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        metrics = evaluator.during(1, model, preprocess, device)
        times.append(time.perf_counter() - start)
    bank = evaluator._shards(model, preprocess, device, {"bank": evaluator.loaders["bank"]})["bank"]
    held = sum(t.element_size() * t.numel() for t in (bank.features, bank.norms, bank.labels, bank.index))
    out[rank] = (statistics.median(times), held, metrics["val_knn_top1_k20"])
    if world > 1:
        dist.destroy_process_group()


def evaluation_time(world: int, threads: int, train_samples: int, files, passes: int) -> tuple[float, int, float]:
    """The slowest rank's median evaluation time, the largest bank shard (bytes), the kNN top-1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, threads, port, train_samples, files, passes, out), nprocs=world, join=True)
    results = [out[r] for r in range(world)]
    return max(r[0] for r in results), max(r[1] for r in results), results[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=12000)
    args = parser.parse_args()
    config = bench_config(1, args.train_samples)
    files = prepare_dataset(config.data, tempfile.mkdtemp(prefix="eval-scaling-"), log=lambda *_: None)
    print(f"synthetic: {files.num_train} training images ({files.num_val} validation, "
          f"{files.num_train - files.num_val} in the bank), {config.data.image_size} px, small_cnn; "
          f"{os.cpu_count()} CPUs")
    runs = {"2 workers x 1 thread": (2, 1), "1 worker x 1 thread": (1, 1), "1 worker x 2 threads": (1, 2)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    held, accuracy = {}, {}
    for repeat in range(args.repeats):
        for name, (world, threads) in runs.items():
            seconds, held[name], accuracy[name] = evaluation_time(world, threads, args.train_samples, files,
                                                                  args.passes)
            times[name].append(seconds)
            print(f"repeat {repeat + 1}: {name}: {seconds:.2f} s")
    assert len(set(accuracy.values())) == 1, f"the configurations disagree on the kNN result: {accuracy}"
    for name in runs:
        print(f"{name}: median {statistics.median(times[name]):.2f} s; largest bank shard held by a rank "
              f"{held[name] / 2**20:.2f} MiB")

    def ratio(a: str, b: str) -> str:
        ratios = [x / y for x, y in zip(times[a], times[b])]
        return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    print(f"1 worker x 2 threads / 1 worker x 1 thread: {ratio('1 worker x 2 threads', '1 worker x 1 thread')}")
    print(f"eval scaling (2 workers / 1 worker): {ratio('2 workers x 1 thread', '1 worker x 1 thread')}")


if __name__ == "__main__":
    main()
