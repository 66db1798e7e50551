"""One training job from the driver's side: data prepared, MLflow run opened, Ray Train fit, outcome logged."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline import checkpoint
from pipeline.config import ExperimentConfig, config_hash, resolve_path, to_dict
from pipeline.data.ffcv_writer import DatasetFiles, manifest_path
from pipeline.data.loaders import prepare_data
from pipeline.tracking import TrackedRun, check_reachable, resolve_tracking_uri


MODEL_FILE = "model.pt"  # the final model's weights, as logged to MLflow


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    final_metrics: dict[str, float]
    initial_metrics: dict[str, float]  # epoch 0: the randomly initialised encoder
    model_path: str | None


def prepare(config: ExperimentConfig, log=print, repair: bool = False) -> DatasetFiles:
    return prepare_data(config.data, resolve_path(config.data.cache_dir), log=log, repair=repair)


def run_name(config: ExperimentConfig) -> str:
    """``ray.run_name``, else ``<name>-<config hash>``: the same command names the same run, so it resumes."""
    return config.ray.run_name or f"{config.name}-{config_hash(config)}"


def train(config: ExperimentConfig, log=print) -> TrainOutcome:
    """Train under Ray Train, or continue the run of the same name from its last checkpoint."""
    from pipeline.ray_train import init_ray, run_training

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    check_reachable(tracking_uri)
    files = prepare(config, log)
    name = run_name(config)
    tracked, resumed = TrackedRun.find_or_start(config, tracking_uri, run_key=name,
                                                tags={"varcon.loss": config.loss.name,
                                                      "varcon.dataset": config.data.dataset})
    if not resumed:
        tracked.log_text(yaml.safe_dump(to_dict(config), sort_keys=False), "config.yaml")
        for beton in filter(None, (files.train, files.test)):
            tracked.log_artifact(manifest_path(beton), "dataset")
    log(f"{'continuing' if resumed else 'starting'} Ray Train run {name} (MLflow run {tracked.run_id} in "
        f"{tracking_uri}); effective learning rate {config.optim.lr} for a global batch of "
        f"{config.optim.global_batch_size} images on {config.ray.num_workers} workers")
    init_ray()
    try:
        result = run_training(config, files, tracking_uri, tracked.run_id, name)
    except BaseException:
        tracked.end("FAILED")
        raise
    model_path = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / MODEL_FILE
            torch.save(checkpoint.load(folder)["model"], weights)
            tracked.log_artifact(weights, "model")
        model_path = str(Path(result.checkpoint.path) / checkpoint.STATE_FILE)
    tracked.end()
    initial = {key: value for key in result.metrics if key.startswith("knn_")
               for step, value in tracked.metric_history(key) if step == 0}
    return TrainOutcome(tracked.run_id, tracking_uri, dict(result.metrics), initial, model_path)
