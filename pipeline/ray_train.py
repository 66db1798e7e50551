"""Ray Train V2 glue: the only module that talks to Ray Train.

``run_training`` builds a ``TorchTrainer`` from the config (workers, CPU/GPU, storage) and fits it; every worker
runs ``train_loop_per_worker``, which hands the plain-PyTorch engine a DDP wrapper and a per-epoch callback that
logs to MLflow (rank 0 only) and reports to Ray (every rank, once per epoch).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import engine
from pipeline.config import ExperimentConfig, from_dict, resolve_path, to_dict
from pipeline.data.ffcv_writer import DatasetFiles

MODEL_FILE = "model.pt"


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from pipeline.tracking import TrackedRun

    config = from_dict(loop_config["experiment"])
    files = DatasetFiles(**loop_config["dataset"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    tracked = TrackedRun(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None

    def on_epoch_end(epoch: int, metrics: dict, training: engine.Training) -> None:
        if tracked is not None:
            tracked.log_metrics(metrics, step=epoch)
        if epoch == config.optim.epochs and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(engine.unwrap(training.model).state_dict(), Path(folder) / MODEL_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    engine.fit(config, files, device, on_epoch_end, wrap_model=ray.train.torch.prepare_model)


def run_training(config: ExperimentConfig, files: DatasetFiles, tracking_uri: str, run_id: str, run_name: str):
    """Fit under Ray Train; returns Ray's ``Result`` (``.metrics``: rank 0's last report, ``.checkpoint``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_dict(config), "dataset": asdict(files),
                           "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": config.ray.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=str(resolve_path(config.ray.storage_path)),
                             failure_config=FailureConfig(max_failures=0)),
    )
    return trainer.fit()


def init_ray() -> None:
    """Connect to the cluster in ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start a local instance."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
