"""A sweep's tracking load on ``mlflow server``: SQLite backend against PostgreSQL backend, side by side.

    python bench/tracking_load.py [--writers 16] [--epochs 50] [--metrics 20] [--repeats 3]

Each round starts one tracking server per backend (``--server-workers`` each, the same command ``cluster.yaml``
runs; PostgreSQL is a throw-away cluster of the Debian package, as in the tests) and runs ``--writers``
concurrent writer processes against it: each creates a run and logs ``--epochs`` epochs of ``--metrics``
metrics, one ``log_batch`` per epoch (what the pipeline's record forwarding sends per checkpoint). A write that
raises after MLflow's own retries counts as errored; afterwards every run's metric histories are read back and
every missing (key, step) counts as lost. Rounds alternate the backends; throughput (metric values per second
over the wall time of all writers) is the median over rounds.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from services import PostgresServer, TrackingService  # noqa: E402 - the tests' own loopback servers


def writer(url: str, index: int, epochs: int, metrics: int, start, results) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("load")
    run = client.create_run(experiment.experiment_id, run_name=f"writer-{index}")
    start.wait()
    errors = 0
    for epoch in range(1, epochs + 1):
        stamp = int(time.time() * 1000)
        batch = [Metric(f"metric_{k:02d}", float(epoch * k), stamp, epoch) for k in range(metrics)]
        try:
            client.log_batch(run.info.run_id, metrics=batch)
        except Exception:  # noqa: BLE001 - counted: a write the server did not take
            errors += 1
    results.put((run.info.run_id, errors, time.monotonic()))


def one_round(url: str, writers: int, epochs: int, metrics: int) -> tuple[float, int, int]:
    """(metric values per second, errored writes, lost writes) of ``writers`` concurrent writers: a lost write is
    an epoch's batch of which some value is not in the store afterwards."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    if client.get_experiment_by_name("load") is None:
        client.create_experiment("load")
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=writer, args=(url, i, epochs, metrics, start, results))
                 for i in range(writers)]
    for process in processes:
        process.start()
    time.sleep(5)  # every writer imported MLflow and created its run
    began = time.monotonic()
    start.set()
    done = [results.get(timeout=1800) for _ in processes]
    for process in processes:
        process.join()
    elapsed = max(finished for _, _, finished in done) - began
    errored = sum(errors for _, errors, _ in done)
    lost = 0
    for run_id, _, _ in done:
        stored = [{m.step for m in client.get_metric_history(run_id, f"metric_{k:02d}")} for k in range(metrics)]
        lost += sum(1 for epoch in range(1, epochs + 1) if not all(epoch in steps for steps in stored))
    return writers * epochs * metrics / elapsed, errored, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-workers", type=int, default=4)
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, int, int]]] = {"sqlite": [], "postgresql": []}
    for repeat in range(args.repeats):
        for backend in ("sqlite", "postgresql") if repeat % 2 == 0 else ("postgresql", "sqlite"):
            folder = tempfile.mkdtemp(prefix=f"varcon-load-{backend}-")
            database = None
            if backend == "postgresql":
                database = PostgresServer().start()
                uri = database.create_database("mlflow")
            else:
                uri = f"sqlite:///{folder}/mlflow.db"
            service = TrackingService(uri, f"{folder}/artifacts", workers=args.server_workers).start()
            try:
                figures[backend].append(one_round(service.url, args.writers, args.epochs, args.metrics))
            finally:
                service.stop()
                if database is not None:
                    database.remove()
            rate, errored, lost = figures[backend][-1]
            print(f"round {repeat + 1} {backend:10s}: {rate:8.0f} values/s, errored writes {errored}, lost writes "
                  f"{lost}", flush=True)
    rate = {b: statistics.median(r for r, _, _ in f) for b, f in figures.items()}
    lost = {b: sum(v for _, _, v in f) for b, f in figures.items()}
    print(f"medians: postgresql {rate['postgresql']:.0f} values/s, sqlite {rate['sqlite']:.0f} values/s "
          f"({args.repeats} rounds each, {args.server_workers} server workers)")
    print(f"tracking load ({args.writers} writers): postgresql/sqlite throughput "
          f"{rate['postgresql'] / rate['sqlite']:.2f}x; lost writes: postgresql {lost['postgresql']}, "
          f"sqlite {lost['sqlite']}")


if __name__ == "__main__":
    main()
