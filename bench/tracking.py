"""MLflow time on the training thread divided by training time, side by side in one run.

    python bench/tracking.py [--epochs 4]

Trains the digits default in this process (engine only, 1 worker, kNN every epoch) against a fresh SQLite store
and times every tracking call made on the training thread:
- pipeline: what the training thread does for tracking: ``RunRecord.add`` per epoch (the worker's part; it goes
  into each checkpoint) and, here in the same thread, the forwarding of each checkpoint's new entries to a
  background ``MetricSender`` (which the pipeline runs in Ray Train's controller, another process: the figure is
  an upper bound);
- sync per epoch: the same metrics through ``MlflowClient.log_batch`` directly;
- sync per step (the naive pattern the engine avoids): one ``log_batch`` of the step metrics per step,
  measured for the same number of steps.
Repeated ``--repeats`` times; the last line is the pipeline's own figure, the median with its spread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


def one_training(epochs: int) -> tuple[dict[str, float], float, int]:
    """Seconds each kind of tracking spent on the training thread, the training time and the step count."""
    from mlflow.entities import Metric

    from pipeline import engine
    from pipeline.config import flatten, load_config
    from pipeline.data import prepare_dataset
    from pipeline.metric_forwarding import MetricSender
    from pipeline.record import RunRecord
    from pipeline.tracking import create_run, resolve_tracking_uri

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as home:
        os.environ["VARCON_HOME"] = home
        config = load_config(None, ["ray.num_workers=1", f"optim.epochs={epochs}", "optim.warmup_epochs=0",
                                    "eval.linear_probe_epochs=0", "eval.few_shot_episodes=0", "name=bench"])
        files = prepare_dataset(config.data, Path(home) / "data", log=lambda *_: None)
        uri = resolve_tracking_uri()
        async_run, sync_run, step_run = (create_run(uri, "varcon", key, key, flatten(config))
                                         for key in ("bench-async", "bench-sync", "bench-steps"))
        record = RunRecord(async_run.run_id, "bench-async", "")
        sender = MetricSender(lambda batch: async_run.client.log_batch(async_run.run_id, metrics=batch))
        spent = {"pipeline": 0.0, "sync per epoch": 0.0, "sync per step": 0.0}
        steps = {"count": 0}

        def timed(kind, call):
            start = time.perf_counter()
            call()
            spent[kind] += time.perf_counter() - start

        def on_epoch_end(epoch, metrics, training):
            def pipeline_logging():  # run_worker records, the controller's RecordForwarder sends
                record.add(epoch, metrics)
                sender.submit(record.own_entries(after_step=epoch - 1))

            timed("pipeline", pipeline_logging)
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
            timed("sync per epoch", lambda: sync_run.client.log_batch(sync_run.run_id, metrics=batch))
            if epoch > 0:
                step_metrics = {k: v for k, v in metrics.items() if k.startswith("train_")}
                for _ in range(len(training.train_batches)):
                    steps["count"] += 1
                    step_batch = [Metric(k, float(v), now, steps["count"]) for k, v in step_metrics.items()]
                    timed("sync per step",
                          lambda b=step_batch: step_run.client.log_batch(step_run.run_id, metrics=b))

        start = time.perf_counter()
        engine.fit(config, files, torch.device("cpu"), on_epoch_end)
        timed("pipeline", lambda: sender.close())
        total = time.perf_counter() - start
        train_time = total - spent["sync per epoch"] - spent["sync per step"]  # only the pipeline's own path

    return spent, train_time, steps["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for repeat in range(args.repeats):  # each training times the three kinds side by side, epoch by epoch
        spent, train_time, steps = one_training(args.epochs)
        runs.append((spent, train_time))
        shares = ", ".join(f"{kind} {seconds / train_time:.3%}" for kind, seconds in spent.items())
        print(f"repeat {repeat + 1}: training (digits, {args.epochs} epochs, {steps} steps, kNN every epoch) "
              f"{train_time:.1f} s; {shares}", flush=True)
    overhead = [spent["pipeline"] / train_time for spent, train_time in runs]
    per_step = [spent["sync per step"] / max(spent["pipeline"], 1e-9) for spent, _ in runs]
    print(f"sync per step / pipeline: {statistics.median(per_step):.0f}x (min {min(per_step):.0f}, "
          f"max {max(per_step):.0f})")
    print(f"mlflow overhead: {statistics.median(overhead):.2%} (min {min(overhead):.2%}, max {max(overhead):.2%}, "
          f"{len(overhead)} repeats)")


if __name__ == "__main__":
    main()
