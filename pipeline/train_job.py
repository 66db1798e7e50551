"""A training's lifecycle, from the driver's side: resolve -> prepare data -> open the run -> train under Ray ->
record the outcome. ``train`` reads in that order; Tune trials use the same ``start_run`` and ``finish_run``.

- **Identity**: ``RunPlan`` derives the run key from what changes the trajectory (``pipeline.identity``), so a
  re-run with other operational settings continues the same run. Its checkpoints live in
  ``<ray.storage_path>/<run key>``; its MLflow run carries the key as a tag.
- **Opening** (``open_run``) compares the store with the checkpoints and refuses what would log a step twice:
  an MLflow run with metrics but no checkpoint at this storage path, a checkpoint whose MLflow run this store does
  not hold, a run key whose recorded trajectory differs. A resumed run records the changed operational keys in
  ``attempts/<n>.yaml``.
- **Truth**: what the run did is in its checkpoints (``pipeline.record.RunRecord``) and Ray's result (why it
  stopped); nothing is read back from MLflow to decide anything.
- **Final status**: ``finish_run`` (re-sends the final record, logs plots, checkpoints, the encoder) and
  ``end_run`` set it; for a single training ``train`` calls them, for a sweep the sweep driver does, once per
  trial.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from pipeline import checkpoint, identity, plots, provenance, storage
from pipeline.cluster import training_bundles
from pipeline.config import ConfigError, ExperimentConfig, flatten, to_dict
from pipeline.console import EpochPrinter, report_queue
from pipeline.data.manifest import manifest_path
from pipeline.data.preflight import prepare
from pipeline.data.prepare import PreparedDataset, dataset_key
from pipeline.models import build_model
from pipeline.names import (
    ATTEMPTS_TAG,
    EARLY_STOPPED_TAG,
    ERROR_TAG,
    EXPLOITS_TAG,
    MODEL_URI_TAG,
    REGISTERED_TAG,
    RUN_FOLDER_TAG,
    RUN_KEY_TAG,
    monitor_source,
)
from pipeline.ray_train import kept_checkpoints, run_training
from pipeline.record import RunRecord
from pipeline.run_status import COMPLETED, Ending, RunStatus
from pipeline.startup import driver_started
from pipeline.storage import Location
from pipeline.tracking import FoundRun, TrackedRun, create_run, find_run, resolve_tracking_uri
from pipeline.worker import worker_argument

if TYPE_CHECKING:
    from ray.util.queue import Queue

ENCODER_MODEL = "encoder"  # name of the final encoder's MLflow PyTorch model


class TrainingDiverged(RuntimeError):
    """The training ended itself before its last epoch (a non-finite loss); the message says why and where the
    last good checkpoint is."""


@dataclass(frozen=True)
class RunPlan:
    """Everything fixed before any work: the config, its identity and where the run lives."""

    config: ExperimentConfig
    run_key: str
    identity: str
    tracking_uri: str
    storage_path: Location  # a local or shared folder, or a bucket URI (``pipeline.storage``)
    run_folder: Location | None  # None: a population trial, whose checkpoints Tune keeps

    @classmethod
    def of(cls, config: ExperimentConfig, own_checkpoints: bool = True) -> RunPlan:
        storage_path = storage.location(config.ray.storage_path)
        key = identity.run_key(config)
        return cls(config, key, identity.identity_digest(config), resolve_tracking_uri(config.tracking.tracking_uri),
                   storage_path, storage_path / key if own_checkpoints else None)


@dataclass
class Checkpointed:
    """A checkpoint folder (local, shared or in a bucket) and its record."""

    folder: Location
    record: RunRecord
    mid_epoch: bool = False  # taken within the epoch after ``record.epoch`` (a preemption notice)

    @classmethod
    def at(cls, folder: Location) -> Checkpointed:
        return cls(folder, RunRecord.from_json((folder / checkpoint.RECORD_FILE).read_text()),
                   (folder / checkpoint.MID_EPOCH_FILE).is_file())

    @property
    def state_file(self) -> Location:
        return self.folder / checkpoint.STATE_FILE


def checkpoints_in(run_folder: Location | str | Path | None, epochs_only: bool = True) -> list[Checkpointed]:
    """The checkpoints Ray Train registered for a run folder (``ray_train.kept_checkpoints``), oldest first; a
    mid-epoch checkpoint (a preemption notice) is left out unless ``epochs_only`` is false: its weights are
    no epoch's, so no final or best model is taken from it."""
    if run_folder is None:
        return []
    if not isinstance(run_folder, Location):
        run_folder = storage.location(str(run_folder))
    found = [Checkpointed.at(folder) for folder in kept_checkpoints(run_folder)]
    return sorted((c for c in found if not (epochs_only and c.mid_epoch)), key=lambda c: (c.record.epoch, c.mid_epoch))


def drop_unregistered(run_folder: Location, registered: list[Checkpointed]) -> list[Location]:
    """Delete the checkpoint folders in a finished run's folder that Ray Train never registered (an upload in
    flight when the run or trial was stopped: its files may be whole or partial, and no restore reads them);
    ``registered``: its ``checkpoints_in(run_folder, epochs_only=False)``. Returns them. Only once the run is over: a
    folder being uploaded now is not registered yet either."""
    registered = {c.folder.path.rstrip("/") for c in registered}
    dropped = [folder for folder in run_folder.folders("checkpoint_") if folder.path.rstrip("/") not in registered]
    for folder in dropped:
        folder.delete_folder()
    return dropped


@dataclass(frozen=True)
class Segment:
    """The Ray Train run that trains a run now: ``run_name`` (its folder in ``ray.storage_path``) and ``start``, the
    checkpoint (a path or URI) it starts from while it has none of its own. A run's own segment is its run key with no
    start: running it again continues its own last checkpoint. A population trial restarts as a new segment from the
    checkpoint its scheduler hands it (its own, or a donor's after an exploit): a Ray Train run of the same name would
    resume the trial's own checkpoints instead (``tune.train_reports``). ``metrics_before_next``: a segment that may
    be ended without warning sends each checkpoint's metrics before it takes the next report
    (``pipeline.ray_callbacks.RecordForwarder``)."""

    run_name: str
    start: str = ""
    metrics_before_next: bool = False


@dataclass
class OpenRun:
    plan: RunPlan
    data: PreparedDataset
    run: TrackedRun
    latest: Checkpointed | None  # the run's latest checkpoint when it was opened

    @property
    def trained_every_epoch(self) -> bool:
        """Its checkpoints held every epoch when it was opened: nothing is left to train."""
        return self.latest is not None and self.latest.record.trained_every_epoch(self.plan.config.optim.epochs)


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    record: RunRecord  # what the run produced, from its final checkpoint
    final: Checkpointed | None  # the final checkpoint
    best: Checkpointed | None  # the checkpoint with the best validation monitor (no validation: the last)
    diverged: str = ""  # why the training ended itself, from Ray's result
    tracking_problem: str | None = None  # set when MLflow did not take the final results

    @property
    def model_path(self) -> str | None:
        """The final checkpoint's ``state.pt`` (a path or URI)."""
        return self.final.state_file.uri if self.final else None

    @property
    def best_model_path(self) -> str | None:
        return self.best.state_file.uri if self.best else None

    @property
    def final_metrics(self) -> dict[str, float]:
        return {"epoch": self.record.epoch, **self.record.at(self.record.epoch)}

    @property
    def initial_metrics(self) -> dict[str, float]:
        return self.record.at(0)


def train(config: ExperimentConfig, log: Callable[[str], None] = print, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None, callbacks: list | tuple = (), verbose: bool = False) -> TrainOutcome:
    """Train under Ray Train, or continue the run of the same identity from its last checkpoint, printing one
    line per epoch (``pipeline.console``). ``parent_run_id`` nests the MLflow run under a sweep; ``callbacks``
    go to Ray Train's ``RunConfig``; ``verbose`` streams Ray's own output here too."""
    plan = RunPlan.of(config)  # resolve
    r = config.ray
    bundles = training_bundles(r.num_workers, r.cpus_per_worker, r.use_gpu)
    with driver_started(config, bundles, bundles, log, verbose) as (data, _):
        opened = start_run(plan, log, parent_run_id, tags, {dataset_key(config.data): data})  # open the run
        printer = EpochPrinter(config.optim.epochs, monitor_source(config.eval) if data.num_val else None, log)
        try:
            with report_queue(printer) as queue:
                outcome = train_opened(opened, log, callbacks, console_queue=queue)  # train under Ray
        except BaseException as exc:
            end_run(opened.run, RunStatus.failed(f"{type(exc).__name__}: {exc}"), guard=True)
            raise
    if outcome.diverged:  # record the outcome
        _record_divergence(opened, outcome)
    _finish_within_outage_wait(opened, outcome, log)
    return outcome


def _record_divergence(opened: OpenRun, outcome: TrainOutcome) -> None:
    """End a diverged run as FAILED (as far as the store lets) and raise ``TrainingDiverged``."""
    try:
        finish_run(opened, outcome, completed=False)
    except Exception:  # noqa: BLE001 - the store may be down: the divergence is what to report
        pass
    end_run(opened.run, RunStatus.failed(f"diverged: {outcome.diverged}"), guard=True)
    raise TrainingDiverged(f"training {opened.plan.run_key} stopped: {outcome.diverged} (last good checkpoint: "
                           f"{outcome.model_path or 'none'})")


def _finish_within_outage_wait(opened: OpenRun, outcome: TrainOutcome, log: Callable[[str], None]) -> None:
    """``finish_run`` and FINISHED, retried for ``tracking.outage_wait_s`` while the store is down; then
    ``outcome.tracking_problem`` says where the model is (the final checkpoint keeps what was not sent)."""
    deadline = time.monotonic() + opened.plan.config.tracking.outage_wait_s
    while True:
        try:
            finish_run(opened, outcome)
            end_run(opened.run, COMPLETED)
            return
        except Exception as exc:  # noqa: BLE001 - an outage must not lose the trained model: its path is printed
            problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            outcome.tracking_problem = (f"MLflow did not take the final results ({problem}); the trained model is "
                                        f"saved in {outcome.model_path}; run the same command again once the store "
                                        f"is back to send them")
            return
        log(f"[tracking] MLflow did not take the final results ({problem}); retrying for up to "
            f"{deadline - time.monotonic():.0f} s more (tracking.outage_wait_s)")
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def start_run(plan: RunPlan, log: Callable[[str], None] = print, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, prepared: dict[str, PreparedDataset] | None = None) -> OpenRun:
    """Prepare the data (or take it from ``prepared``, keyed by ``dataset_key``) and open the MLflow run."""
    data = (prepared or {}).get(dataset_key(plan.config.data)) or prepare(plan.config, log)
    return open_run(plan, data, log, parent_run_id, tags)


def train_opened(opened: OpenRun, log: Callable[[str], None] = print, callbacks: list | tuple = (),
                 console_queue: Queue | None = None, segment: Segment | None = None) -> TrainOutcome:
    """Train an opened run under Ray Train (or nothing, when its checkpoints hold every epoch already); rank 0's
    reports go to ``console_queue`` (``pipeline.console.report_queue``) if given. A ``segment`` trains it as a Ray
    Train run of its own from a given checkpoint (a population trial's restart), else as the run of its run key."""
    plan, config = opened.plan, opened.plan.config
    if opened.trained_every_epoch:
        log(f"run {plan.run_key} has trained all {config.optim.epochs} epochs already: nothing to train (a "
            f"finished run is not evaluated again here: `varcon eval --checkpoint {opened.latest.folder}` "
            f"evaluates it with other eval.* settings)")
        return outcome_from_checkpoints(opened)
    log(f"{'continuing' if opened.latest else 'starting'} Ray Train run {plan.run_key} (MLflow run "
        f"{opened.run.run_id} in {plan.tracking_uri}); effective learning rate {config.optim.lr} for a global "
        f"batch of {config.optim.global_batch_size} images on {config.ray.num_workers} workers")
    segment = segment or Segment(plan.run_key)
    argument = worker_argument(config, opened.data, opened.run.run_id, plan.run_key, plan.identity, segment.start)
    result = run_training(config, argument, segment.run_name, str(plan.storage_path), callbacks, console_queue,
                          segment.metrics_before_next)
    return outcome_from_checkpoints(opened, diverged=result.return_value or "")


def outcome_from_checkpoints(opened: OpenRun, diverged: str = "",
                             kept: list[Checkpointed] | None = None) -> TrainOutcome:
    """The outcome of a run from its checkpoints (``kept``, default: those in its run folder): the final one,
    and the best by the validation monitor among them (without validation, the final one)."""
    kept = checkpoints_in(opened.plan.run_folder) if kept is None else kept
    if not kept:
        record = RunRecord(opened.run.run_id, opened.plan.run_key, opened.plan.identity)
        return TrainOutcome(opened.run.run_id, opened.plan.tracking_uri, record, None, None, diverged)
    final = kept[-1]
    monitor_key = monitor_source(opened.plan.config.eval)
    best = max(kept, key=lambda c: (c.record.monitor(monitor_key, c.record.epoch), c.record.epoch))
    return TrainOutcome(opened.run.run_id, opened.plan.tracking_uri, final.record, final, best, diverged)


def open_run(plan: RunPlan, data: PreparedDataset, log: Callable[[str], None] = print,
             parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> OpenRun:
    """The run's MLflow run, found again by its run key or created with the resolved config (params and
    ``config.yaml``), the dataset manifests and the environment; refuses what would log a step twice."""
    config = plan.config
    found = find_run(plan.tracking_uri, config.tracking.experiment, plan.run_key)
    kept = checkpoints_in(plan.run_folder, epochs_only=False)
    latest = kept[-1] if kept else None
    fresh = ("start a fresh run with another `name` or `ray.run_name` (see README: Run lifecycle)")
    if latest is not None and latest.record.identity != plan.identity:
        changed = identity.changed_keys(found.params, config) if found else {}
        listed = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items())
                           if k not in identity.OPERATIONAL) or "see its config.yaml"
        raise ConfigError(f"ray.run_name={plan.run_key} names a run trained with other settings ({listed}): "
                          f"{fresh}")
    if latest is not None and (found is None or found.run_id != latest.record.run_id):
        raise ConfigError(f"the checkpoints in {plan.run_folder} belong to MLflow run {latest.record.run_id}, which "
                          f"the store {plan.tracking_uri} (experiment {config.tracking.experiment}) does not hold: "
                          f"point tracking.tracking_uri/tracking.experiment at the store that holds it, or {fresh}")
    if latest is None and found is not None and found.metric_keys and plan.run_folder is not None:
        raise ConfigError(f"MLflow run {found.run_id} of run {plan.run_key} already holds metrics, but no checkpoint "
                          f"of it is in {plan.run_folder} (it was trained with checkpoints in "
                          f"{found.tags.get(RUN_FOLDER_TAG, 'another folder')}): set ray.storage_path back to the "
                          f"storage that holds them, or {fresh}")
    if found is None:
        run = _create(plan, data, parent_run_id, tags)
    else:
        run = TrackedRun(plan.tracking_uri, found.run_id)
        run.reopen()
        _record_attempt(run, found, config, log)
    return OpenRun(plan, data, run, latest)


def _create(plan: RunPlan, data: PreparedDataset, parent_run_id: str | None, tags: dict[str, str] | None
            ) -> TrackedRun:
    config = plan.config
    code = provenance.code_version()
    all_tags = {**code.tags(), "varcon.loss": config.loss.name, "varcon.dataset": config.data.dataset,
                "varcon.schedule": config.loss.schedule.kind, RUN_FOLDER_TAG: str(plan.run_folder or ""),
                ATTEMPTS_TAG: "1", **(tags or {})}
    run = create_run(plan.tracking_uri, config.tracking.experiment, plan.run_key, config.name, flatten(config),
                     all_tags, parent_run_id)
    run.log_text(yaml.safe_dump(to_dict(config), sort_keys=False), "config.yaml")
    for beton in filter(None, (data.train, data.test)):
        run.log_artifact(manifest_path(beton), "dataset")
    run.log_environment()
    if code.dirty:
        run.log_text(code.patch(), "code/uncommitted.diff")
    return run


def _record_attempt(run: TrackedRun, found: FoundRun, config: ExperimentConfig, log: Callable[[str], None]
                    ) -> None:
    """A resumed run's new attempt: ``attempts/<n>.yaml`` holds the keys whose values differ from the run's
    (write-once) params, and the resolved config; ``varcon.attempts`` counts them."""
    attempt = int(found.tags.get(ATTEMPTS_TAG, "1")) + 1
    changed = identity.changed_keys(found.params, config)
    run.log_text(yaml.safe_dump({"changed": {k: {"recorded": a, "now": b} for k, (a, b) in changed.items()},
                                 "config": to_dict(config)}, sort_keys=False), f"attempts/{attempt}.yaml")
    run.set_tags({ATTEMPTS_TAG: str(attempt)})
    if changed:
        log(f"attempt {attempt} of run {found.tags.get(RUN_KEY_TAG, '')} with changed settings: "
            + ", ".join(f"{k}={b} (was {a})" for k, (a, b) in sorted(changed.items())))


def end_run(run: TrackedRun, status: RunStatus, guard: bool = False) -> None:
    """Set a run's final status (``RunStatus``: FINISHED, KILLED tagged early-stopped, or FAILED with the error
    as a tag). ``guard``: a store outage is ignored (the caller has a more important error to report)."""
    try:
        if status.error:
            run.set_tags({ERROR_TAG: status.error[:4000]})
        elif ERROR_TAG in run.tags():
            run.delete_tag(ERROR_TAG)  # an earlier attempt's error; this one ended otherwise
        if status.ending is Ending.EARLY_STOPPED:
            run.set_tags({EARLY_STOPPED_TAG: "true"})
        run.end(status.mlflow_status)
    except Exception:  # noqa: BLE001
        if not guard:
            raise


def finish_run(opened: OpenRun, outcome: TrainOutcome, completed: bool = True) -> None:
    """Send the final record (idempotent), the exploit lineage and the learning-curve and temperature plots; for a
    ``completed`` training also the workers' plots, the checkpoints, the final encoder as an MLflow PyTorch model
    and its registration (``tracking.registered_model_name``). Idempotent: a second call logs no second model or
    model version. The status is ``end_run``'s."""
    run, config, record = opened.run, opened.plan.config, outcome.record
    run.log_entries(record.own_entries())
    if record.exploits:
        run.set_tags({EXPLOITS_TAG: json.dumps(record.exploits)})
    histories = record.history()
    with tempfile.TemporaryDirectory() as folder:
        plots.learning_curves_plot(histories, Path(folder) / "learning_curves.png")
        plots.temperature_plot(histories, Path(folder) / "temperature_schedule.png")
        run.log_artifacts(folder, "plots")
    if not completed or outcome.final is None:
        return
    tags = run.tags()
    if MODEL_URI_TAG not in tags:  # the encoder is logged last: with it, everything before it is there too
        with outcome.final.folder.as_local_folder() as final_folder:
            if (final_folder / checkpoint.PLOTS_FOLDER).is_dir():
                run.log_artifacts(final_folder / checkpoint.PLOTS_FOLDER, "plots")
            if config.tracking.log_checkpoints:
                run.log_artifact(final_folder / checkpoint.STATE_FILE, "checkpoints/final")
                with outcome.best.folder.as_local_folder() as best_folder:
                    run.log_artifact(best_folder / checkpoint.STATE_FILE, "checkpoints/best")
            model = build_model(config, opened.data.num_classes)
            model.load_state_dict(checkpoint.load(final_folder)["model"])
        size = config.data.image_size
        run.log_pytorch_model(model.encoder, ENCODER_MODEL, torch.zeros(2, 3, size, size))
    name = config.tracking.registered_model_name
    if name and REGISTERED_TAG not in tags:
        run.set_tags({REGISTERED_TAG: f"{name}/{run.register_model(name)}"})
