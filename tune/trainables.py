"""The functions Ray Tune runs, one call per trial. Both open the trial's run with ``train_job.start_run`` and
leave its final status to the sweep driver (``tune.sweep.summarise``), the one owner of trial outcomes.

- ``train_trial`` (random/optuna with fifo/asha): the Ray Train V2 pattern: the trial builds its experiment from
  the sampled values and trains it under a full ``TorchTrainer`` (DDP over ``ray.num_workers``), nested under the
  sweep's MLflow parent run; ``tune.train_reports.EpochReportsToTune`` forwards every epoch to Tune, which is
  what ASHA stops on. A trial that trains every epoch logs its artifacts and encoder itself (trials do that side
  by side).
- ``population_trial`` (pbt/pb2): one training process per trial, reporting checkpoints to Tune itself, because a
  population-based exploit must hand a checkpoint from one trial to another and V2's Train-to-Tune callback
  forwards metrics only. It runs the same worker loop (``pipeline.worker.run_worker``) as a Train worker; the
  sweep driver forwards its checkpoints' records to MLflow (``tune.sweep.ForwardTrialRecords``).

A trial whose loss became non-finite returns normally with ``diverged`` in its last result: Tune does not retry
it (the divergence would repeat), and the sweep driver records it as failed with the reason.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline import checkpoint, storage
from pipeline.data.prepare import PreparedDataset
from pipeline.names import SWEEP_TAG, TRIAL_ID_TAG, monitor_source
from pipeline.record import RunRecord
from pipeline.storage import Location
from pipeline.train_job import RunPlan, finish_run, start_run, train_opened
from pipeline.worker import monitored, run_worker, worker_argument
from tune.spec import SweepSpec

RECORDS_FOLDER = "varcon_records"  # in the sweep's folder: per trial, the run record of every checkpoint it reported


def records_folder(spec: SweepSpec, trial_id: str) -> Location:
    """Where a population trial keeps its reported records: ``<ray.storage_path>/<sweep>/varcon_records/<trial>``
    (beside Tune's own trial folders, on the same storage)."""
    return storage.location(spec.base.ray.storage_path) / spec.settings.name / RECORDS_FOLDER / trial_id


def keep_record(folder: Location, checkpoint_dir: Path) -> None:
    """Copy the checkpoint's run record to ``<folder>/epoch_<n>-<run id>.json``: a PBT exploit restarts the
    trial's checkpoint numbering from the donor's, so Tune's own folder of the epoch before an exploit can be
    overwritten or never written."""
    record = checkpoint.load_record(checkpoint_dir)
    (folder / f"epoch_{record.epoch:05d}-{record.run_id}.json").write_text(record.to_json())


def kept_records(folder: Location) -> list[RunRecord]:
    """The run records ``keep_record`` kept in ``folder``, oldest epoch first."""
    found = [RunRecord.from_json(place.read_text()) for place in folder.files(".json")]
    return sorted(found, key=lambda r: r.epoch)


def trial_tags(spec: SweepSpec, trial_id: str) -> dict[str, str]:
    return {SWEEP_TAG: spec.settings.name, TRIAL_ID_TAG: trial_id}


class TuneSession:
    """``pipeline.worker.Session`` for a single-process Tune trial."""

    def __init__(self, use_gpu: bool, records: Location) -> None:
        self.use_gpu = use_gpu
        self.records = records

    def report(self, metrics: dict, checkpoint_dir: str | None, persist_now: bool = False) -> None:
        import ray.tune

        if checkpoint_dir:  # Tune may drop or overwrite the checkpoint of a result it answers with an exploit
            keep_record(self.records, Path(checkpoint_dir))
        found = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=found)

    def preemption_notice(self) -> bool:
        return False  # a single-process trial: Tune restarts it from its last checkpoint on a lost node

    def last_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()  # after a PBT exploit: the donor trial's checkpoint

    def rank(self) -> int:
        return 0

    def device(self) -> torch.device:
        return torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def _open_trial(sampled: dict, spec: SweepSpec, parent_run_id: str, prepared: dict[str, PreparedDataset]):
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    config = spec.trial_config(sampled, trial_id)
    plan = RunPlan.of(config, own_checkpoints=not spec.population_based)
    return start_run(plan, lambda *_: None, parent_run_id, trial_tags(spec, trial_id), prepared)


def train_trial(sampled: dict, spec: SweepSpec, parent_run_id: str, prepared: dict[str, PreparedDataset]) -> None:
    import ray.tune

    from tune.train_reports import EpochReportsToTune

    opened = _open_trial(sampled, spec, parent_run_id, prepared)
    config = opened.plan.config
    if opened.trained_every_epoch:
        # trained before a restored sweep's driver recorded it: Tune gets the final result again
        ray.tune.report(opened.latest.record.report(monitor_source(config.eval)))
        return
    outcome = train_opened(opened, lambda *_: None, callbacks=[EpochReportsToTune()])
    if not outcome.diverged and outcome.record.trained_every_epoch(config.optim.epochs):
        finish_run(opened, outcome)


def population_trial(sampled: dict, spec: SweepSpec, parent_run_id: str,
                     prepared: dict[str, PreparedDataset]) -> None:
    import ray.tune

    opened = _open_trial(sampled, spec, parent_run_id, prepared)
    plan = opened.plan
    records = records_folder(spec, ray.tune.get_context().get_trial_id())
    argument = worker_argument(plan.config, opened.data, opened.run.run_id, plan.run_key, plan.identity)
    with monitored(argument, local_rank=0):  # one trial process per node slot: its own monitor
        run_worker(argument, TuneSession(plan.config.ray.use_gpu, records))
