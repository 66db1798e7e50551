"""The functions Ray Tune runs, one call per trial.

- ``train_trial`` (random/optuna with fifo/asha): the Ray Train V2 pattern: the trial builds its experiment from
  the sampled values and runs ``pipeline.train_job.train``, i.e. a full ``TorchTrainer`` (DDP over
  ``ray.num_workers``), nested under the sweep's MLflow parent run; Ray's ``TuneReportCallback`` forwards every
  epoch's metrics to Tune, which is what ASHA stops on.
- ``population_trial`` (pbt/pb2): one training process per trial, reporting checkpoints to Tune itself, because a
  population-based exploit must hand a checkpoint from one trial to another and V2's Train-to-Tune callback
  forwards metrics only. It runs the same worker loop (``pipeline.ray_train.run_worker``) as a Train worker.

A trial whose training stopped itself (a non-finite loss) raises ``TrainingStopped``, so Tune records it as
errored with that reason; Tune's retry of it (``tune.max_failures``) raises again at once instead of replaying
the divergence from the last checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tune.spec import SweepSpec


def trial_tags(spec: SweepSpec, trial_id: str) -> dict[str, str]:
    return {"varcon.sweep": spec.settings.name, "varcon.trial_id": trial_id}


def hooks_for_trial(test_hooks: dict[str, str]) -> dict[str, str]:
    """The driver's test hooks if they apply to the calling trial: ``VARCON_TEST_TRIAL=n`` confines them to the
    n-th trial the search created (counted from 1: the number after the trial id in its folder name)."""
    import ray.tune

    only = test_hooks.get("VARCON_TEST_TRIAL")
    context = ray.tune.get_context()
    folder = Path(context.get_trial_dir()).name  # <trainable>_<trial id>_<n>_<sampled values>_<date>
    return test_hooks if not only or f"_{context.get_trial_id()}_{only}_" in folder else {}


def refuse_stopped(config, tracking_uri: str) -> None:
    """Raise ``TrainingStopped`` with the recorded reason if this trial's run already stopped itself."""
    from pipeline.tracking import TrackedRun
    from pipeline.train_job import TrainingStopped, run_name, stopped_reason

    found = TrackedRun.find(tracking_uri, config.tracking.experiment, run_name(config))
    reason = stopped_reason(found) if found else ""
    if reason:
        raise TrainingStopped(f"training {run_name(config)} {reason} (not retried)")


class TuneSession:
    """``pipeline.ray_train.Session`` for a single-process Tune trial."""

    def __init__(self, use_gpu: bool) -> None:
        self.use_gpu = use_gpu

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        found = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=found)

    def last_checkpoint_state(self) -> dict | None:
        import ray.tune

        from pipeline.ray_train import checkpoint_state

        return checkpoint_state(ray.tune.get_checkpoint())  # after a PBT exploit: the donor trial's checkpoint

    def rank(self) -> int:
        return 0

    def device(self) -> torch.device:
        return torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def train_trial(sampled: dict, spec: SweepSpec, parent_run_id: str, test_hooks: dict[str, str]) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.tracking import resolve_tracking_uri
    from pipeline.train_job import train

    trial_id = ray.tune.get_context().get_trial_id()
    config = spec.trial_config(sampled, trial_id)
    refuse_stopped(config, resolve_tracking_uri(config.tracking.tracking_uri))
    train(config, parent_run_id=parent_run_id, tags=trial_tags(spec, trial_id), callbacks=[TuneReportCallback()],
          test_hooks=hooks_for_trial(test_hooks))


def population_trial(sampled: dict, spec: SweepSpec, parent_run_id: str, test_hooks: dict[str, str]) -> None:
    import ray.tune

    from pipeline.config import resolve_path
    from pipeline.ray_train import loop_config, run_worker
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.train_job import TrainingStopped, open_run, prepare, run_name

    trial_id = ray.tune.get_context().get_trial_id()
    config = spec.trial_config(sampled, trial_id)
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    refuse_stopped(config, tracking_uri)
    files = prepare(config, log=lambda *_: None)
    name = run_name(config)
    tracked, _ = open_run(config, files, tracking_uri, name, parent_run_id, trial_tags(spec, trial_id))
    loop = loop_config(config, files, tracking_uri, tracked.run_id, str(resolve_path(config.ray.storage_path) / name),
                       hooks_for_trial(test_hooks))
    try:
        stopped = run_worker(loop, TuneSession(config.ray.use_gpu))
        if stopped:
            raise TrainingStopped(f"trial {trial_id} {stopped}")
    except Exception as exc:
        tracked.fail(exc)
        raise
