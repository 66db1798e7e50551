"""One training job from the driver's side: data prepared, MLflow run opened, Ray Train fit, outcome logged."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline import checkpoint, plots
from pipeline.config import ExperimentConfig, config_hash, resolve_path, to_dict
from pipeline.data.ffcv_writer import DatasetFiles, manifest_path
from pipeline.data.loaders import prepare_data
from pipeline.models import build_model
from pipeline.tracking import ERROR_TAG, MODEL_URI_TAG, TrackedRun, check_reachable, resolve_tracking_uri

ENCODER_MODEL = "encoder"  # name of the final encoder's MLflow PyTorch model
REGISTERED_TAG = "varcon.registered_model"


class TrainingStopped(RuntimeError):
    """The training ended itself before its last epoch (a non-finite loss); the message says why and where the
    last good checkpoint is."""


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    final_metrics: dict[str, float]
    initial_metrics: dict[str, float]  # epoch 0: the randomly initialised encoder
    model_path: str | None  # the final checkpoint's state.pt, on local (or shared) storage
    best_model_path: str | None  # the checkpoint with the best kNN monitor
    tracking_problem: str | None = None  # set when MLflow did not take the final results


def prepare(config: ExperimentConfig, log=print, repair: bool = False) -> DatasetFiles:
    return prepare_data(config.data, resolve_path(config.data.cache_dir), log=log, repair=repair)


def run_name(config: ExperimentConfig) -> str:
    """``ray.run_name``, else ``<name>-<config hash>``: the same command names the same run, so it resumes."""
    return config.ray.run_name or f"{config.name}-{config_hash(config)}"


def open_run(config: ExperimentConfig, files: DatasetFiles, tracking_uri: str, run_key: str,
             parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> tuple[TrackedRun, bool]:
    """The training's MLflow run, found again by ``run_key`` or created with the resolved config (params and
    ``config.yaml``), the dataset manifests and the environment. A run found again first gets the metrics an
    earlier attempt could not send (``<storage>/<run_key>/unlogged_metrics.json``)."""
    tracked, resumed = TrackedRun.find_or_start(
        config, tracking_uri, run_key, parent_run_id=parent_run_id,
        tags={"varcon.loss": config.loss.name, "varcon.dataset": config.data.dataset,
              "varcon.schedule": config.loss.schedule.kind, **(tags or {})})
    if not resumed:
        tracked.log_text(yaml.safe_dump(to_dict(config), sort_keys=False), "config.yaml")
        for beton in filter(None, (files.train, files.test)):
            tracked.log_artifact(manifest_path(beton), "dataset")
        tracked.log_environment()
    elif sent := tracked.log_saved_metrics(resolve_path(config.ray.storage_path) / run_key):
        print(f"[tracking] sent {sent} metric values an earlier attempt kept while MLflow was unreachable")
    return tracked, resumed


def train(config: ExperimentConfig, log=print, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None, callbacks: list | None = None,
          test_hooks: dict[str, str] | None = None) -> TrainOutcome:
    """Train under Ray Train, or continue the run of the same name from its last checkpoint. ``parent_run_id``
    nests the MLflow run under a sweep; ``callbacks`` go to Ray Train's ``RunConfig``; ``test_hooks`` (fault
    injection, tests only) to the workers."""
    from pipeline.ray_train import init_ray, require_resources, run_training

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    check_reachable(tracking_uri)
    init_ray()
    r = config.ray
    require_resources(r.num_workers * r.cpus_per_worker, r.num_workers * float(r.use_gpu), r.resource_wait_s, log)
    files = prepare(config, log)
    name = run_name(config)
    tracked, resumed = open_run(config, files, tracking_uri, name, parent_run_id, tags)
    log(f"{'continuing' if resumed else 'starting'} Ray Train run {name} (MLflow run {tracked.run_id} in "
        f"{tracking_uri}); effective learning rate {config.optim.lr} for a global batch of "
        f"{config.optim.global_batch_size} images on {config.ray.num_workers} workers")
    try:
        result = run_training(config, files, tracking_uri, tracked.run_id, name, callbacks, test_hooks)
    except BaseException as exc:
        try:
            tracked.fail(exc)
        except Exception:  # noqa: BLE001 - the training's own error matters more than the store's
            pass
        raise
    try:
        reason = stopped_reason(tracked)
    except Exception:  # noqa: BLE001 - the store is down: record_outcome below reports it with the model path
        reason = ""
    if reason and result.metrics.get("epoch", 0) < config.optim.epochs:
        tracked.fail()  # the worker tagged the reason
        checkpoint_path = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingStopped(f"training {name} {reason} (last good checkpoint: {checkpoint_path})")
    final, best = state_paths(result)
    outcome = TrainOutcome(tracked.run_id, tracking_uri, dict(result.metrics), {}, final, best)
    try:
        record_outcome(config, files, tracked, outcome)
    except Exception as exc:  # noqa: BLE001 - an outage must not lose the trained model: its path is printed
        outcome.tracking_problem = (f"MLflow did not take the final results ({type(exc).__name__}: {exc}); the "
                                    f"trained model is saved locally in {final}")
    return outcome


def stopped_reason(tracked: TrackedRun) -> str:
    """Why the run's training ended itself (its ``varcon.error`` from a non-finite loss), else ``""``."""
    from pipeline.ray_train import STOPPED_PREFIX

    reason = tracked.tags().get(ERROR_TAG, "")
    return reason if reason.startswith(STOPPED_PREFIX) else ""


def state_paths(result, last_folder: str | None = None) -> tuple[str | None, str | None]:
    """The ``state.pt`` of a Ray ``Result``'s last checkpoint (or of ``last_folder``) and of its best one by
    the kNN monitor (the last one when none is ranked)."""
    from pipeline.ray_train import MONITOR

    folder = result.checkpoint.path if result.checkpoint else last_folder
    final = str(Path(folder) / checkpoint.STATE_FILE) if folder else None
    best_checkpoint = result.get_best_checkpoint(MONITOR, "max") if result.best_checkpoints else None
    best = str(Path(best_checkpoint.path) / checkpoint.STATE_FILE) if best_checkpoint else final
    return final, best


def record_outcome(config: ExperimentConfig, files: DatasetFiles, tracked: TrackedRun, outcome: TrainOutcome) -> None:
    """Log the checkpoints, the final encoder as an MLflow PyTorch model (registered when
    ``tracking.registered_model_name`` is set), learning-curve and temperature plots; end the run.
    Idempotent: re-running a finished training logs no second model or model version."""
    histories = tracked.metric_histories()
    outcome.initial_metrics = {key: value for key, history in histories.items() if key.startswith("knn_")
                               for step, value in history if step == 0}
    with tempfile.TemporaryDirectory() as folder:
        plots.learning_curves_plot(histories, Path(folder) / "learning_curves.png")
        plots.temperature_plot(histories, Path(folder) / "temperature_schedule.png")
        tracked.log_artifacts(folder, "plots")
    if outcome.model_path is None:
        tracked.end()
        return
    if config.tracking.log_checkpoints:
        tracked.log_artifact(outcome.model_path, "checkpoints/final")
        tracked.log_artifact(outcome.best_model_path, "checkpoints/best")
    tags = tracked.tags()
    if MODEL_URI_TAG not in tags:
        state = checkpoint.load(Path(outcome.model_path).parent)
        model = build_model(config, files.num_classes)
        model.load_state_dict(state["model"])
        size = config.data.image_size
        tracked.log_pytorch_model(model.encoder, ENCODER_MODEL, torch.zeros(2, 3, size, size))
    name = config.tracking.registered_model_name
    if name and REGISTERED_TAG not in tags:
        version = tracked.register_model(name)
        tracked.set_tags({REGISTERED_TAG: f"{name}/{version}"})
    tracked.end()
