"""One training job from the driver's side: data prepared, MLflow run opened, Ray Train fit, outcome logged."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import ExperimentConfig, resolve_path, to_dict
from pipeline.data.ffcv_writer import DatasetFiles
from pipeline.data.loaders import prepare_data
from pipeline.tracking import TrackedRun, resolve_tracking_uri


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    final_metrics: dict[str, float]
    initial_metrics: dict[str, float]  # epoch 0: the randomly initialised encoder
    model_path: str | None


def prepare(config: ExperimentConfig, log=print, repair: bool = False) -> DatasetFiles:
    return prepare_data(config.data, resolve_path(config.data.cache_dir), log=log, repair=repair)


def train(config: ExperimentConfig, log=print) -> TrainOutcome:
    from pipeline.ray_train import MODEL_FILE, init_ray, run_training

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    files = prepare(config, log)
    tracked = TrackedRun.start(config, tracking_uri, tags={"varcon.loss": config.loss.name,
                                                           "varcon.dataset": config.data.dataset})
    tracked.log_text(yaml.safe_dump(to_dict(config), sort_keys=False), "config.yaml")
    for beton in filter(None, (files.train, files.test)):
        tracked.log_artifact(beton + ".manifest.json", "dataset")
    run_name = config.ray.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{tracked.run_id[:8]}"
    log(f"MLflow run {tracked.run_id} in {tracking_uri}; Ray Train run {run_name}")
    init_ray()
    try:
        result = run_training(config, files, tracking_uri, tracked.run_id, run_name)
    except BaseException:
        tracked.end("FAILED")
        raise
    model_path = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            tracked.log_artifact(Path(folder) / MODEL_FILE, "model")
        model_path = str(Path(result.checkpoint.path) / MODEL_FILE)
    tracked.end()
    initial = {key: value for key in result.metrics if key.startswith("knn_")
               for step, value in tracked.metric_history(key) if step == 0}
    return TrainOutcome(tracked.run_id, tracking_uri, dict(result.metrics), initial, model_path)
