"""One training worker's life, apart from Ray: restore, train, report every epoch, checkpoint, stop on divergence.

``run_worker`` runs in every Ray Train worker (``pipeline.ray_train``; engine tests give it a session of their own):
it needs only a small ``Session`` (report, last checkpoint, rank, device, model wrapper).
What crosses the process boundary to it is one ``WorkerArgument``. Workers do not talk to MLflow about metrics:
rank 0 writes each checkpoint with the run's ``RunRecord`` (every metric value so far), and whoever reads the
report stream forwards it (``pipeline.metric_forwarding``). A worker of local rank 0 may watch its node's system
metrics (``monitored``).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from pipeline import checkpoint, engine, faults, plots, system_metrics
from pipeline.config import ExperimentConfig, to_dict
from pipeline.data.manifest import sha256_of
from pipeline.data.prepare import PreparedDataset
from pipeline.evaluator import FinalFeatures
from pipeline.models import unwrap
from pipeline.names import CHECKPOINT_RANK, DIVERGED, MID_EPOCH_RANK, MONITOR, PREEMPTION_STEP, monitor_source
from pipeline.record import RunRecord, StoredCheckpoint
from pipeline.tracking import resolve_tracking_uri


class Session(Protocol):
    """What the training loop needs from Ray Train. ``report(..., persist_now=True)``: the checkpoint is
    stored before ``report`` returns, even where uploads are otherwise asynchronous (a node about to go).
    ``preemption_notice`` is a collective: every rank asks at the same steps and gets the same answer."""

    def report(self, metrics: dict, checkpoint_dir: str | None, persist_now: bool = False) -> None: ...
    def preemption_notice(self) -> bool: ...
    def last_checkpoint(self) -> StoredCheckpoint | None: ...  # a Ray ``Checkpoint`` or None
    def rank(self) -> int: ...
    def device(self) -> torch.device: ...
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass(frozen=True)
class WorkerArgument:
    """Everything a worker is given (pickled to each worker process): the resolved config, the prepared data, the
    run's MLflow run id, run key and identity, the tracking URI the driver resolved, the faults a test injects into
    this run (``pipeline.faults``), and ``start_checkpoint``: the URI of a checkpoint to start from while the Ray
    Train run has none of its own (a population trial's restart: its own last checkpoint, or a donor's after an
    exploit)."""

    config: ExperimentConfig
    dataset: PreparedDataset
    run_id: str
    run_key: str
    identity: str
    tracking_uri: str
    faults: dict = field(default_factory=dict)
    start_checkpoint: str = ""


def worker_argument(config: ExperimentConfig, data: PreparedDataset, run_id: str, run_key: str,
                    identity: str, start_checkpoint: str = "") -> WorkerArgument:
    """The ``WorkerArgument`` of a run, with the faults a test injects into it."""
    return WorkerArgument(config, data, run_id, run_key, identity,
                          resolve_tracking_uri(config.tracking.tracking_uri), faults.for_run(run_key),
                          start_checkpoint)


def monitored(argument: WorkerArgument, local_rank: int, node: str | None = None
              ) -> contextlib.AbstractContextManager[None]:
    """The node's system-metrics monitor around a worker's training, on the worker of local rank 0 when
    ``tracking.system_metrics`` asks for it (``pipeline.system_metrics``); else nothing."""
    t = argument.config.tracking
    if local_rank != 0 or not system_metrics.enabled(t.system_metrics, argument.config.ray.use_gpu):
        return contextlib.nullcontext()
    return system_metrics.node_monitor(argument.run_id, argument.tracking_uri, t.system_metrics_interval_s, node)


class PreemptionWatch:
    """Whether a node of the run has a preemption notice: asked of the session (a collective) until one is seen,
    then remembered (the node is going; asking again changes nothing)."""

    def __init__(self, session: Session) -> None:
        self.session, self.noticed = session, False

    def check(self) -> bool:
        if not self.noticed:
            self.noticed = bool(self.session.preemption_notice())
        return self.noticed


EPOCH_RANK_FLOOR = 0.0  # above MID_EPOCH_RANK


def _checkpointed(report: dict, rank: float) -> dict:
    """A report that carries a checkpoint, with the rank Ray Train keeps checkpoints by (``CHECKPOINT_RANK``)."""
    return {**report, CHECKPOINT_RANK: rank}


class EpochReporter:
    """``engine.fit``'s end-of-epoch callback: adds the epoch to the record, reports on every rank (rank 0 with a
    checkpoint every ``ray.checkpoint_every`` epochs, at ``ray.checkpoint_at_epochs``, at the end and, once a
    preemption notice was seen, every epoch, stored before the report returns; each holds the plots drawn so
    far), then lets a test's faults act.
    ``last`` is the latest report, repeated with the reason if the loss diverges. A checkpoint ranks by the
    validation monitor, or without validation by its epoch (the latest two are kept), never below
    ``EPOCH_RANK_FLOOR`` (a monitor not yet measured is -inf), so always above a mid-epoch checkpoint. With
    ``ray.preemption_check_steps`` it also asks for a notice at every epoch's end, however short the epoch."""

    def __init__(self, argument: WorkerArgument, session: Session, record: RunRecord, monitor_key: str | None,
                 plots_folder: Path, resumed: bool, watch: PreemptionWatch) -> None:
        self.argument, self.session, self.record, self.monitor_key = argument, session, record, monitor_key
        self.plots_folder, self.resumed, self.rank, self.watch = plots_folder, resumed, session.rank(), watch
        self.last = record.report(monitor_key)

    def __call__(self, epoch: int, metrics: dict, training: engine.Training) -> None:
        config = self.argument.config
        self.record.add(epoch, metrics)
        self.record.epoch = epoch
        self.last = self.record.report(self.monitor_key)
        if epoch > 0 and config.ray.preemption_check_steps > 0:
            self.watch.check()  # at least once an epoch, however short (a collective: every rank is here)
        due = epoch > 0 and (epoch % config.ray.checkpoint_every == 0 or epoch == config.optim.epochs
                             or epoch in config.ray.checkpoint_at_epochs or self.watch.noticed)
        failing = faults.fails_after_epoch(self.argument.faults, epoch, self.resumed)  # every rank: one mode
        if due:
            rank = max(self.last.get(MONITOR, float(epoch)), EPOCH_RANK_FLOOR)
            self.report_checkpoint(_checkpointed(self.last, rank),
                                   lambda: checkpoint.capture(training, epoch, to_dict(config)), persist_now=failing)
        else:
            self.session.report(dict(self.last), None)
        if self.rank == 0:
            faults.after_epoch(self.argument.faults, epoch, self.resumed, unwrap(training.model))

    def report_checkpoint(self, report: dict, state_of: Callable[[], dict], persist_now: bool = False) -> None:
        """Report on every rank, rank 0 with the state (``state_of()``) and the record as a checkpoint; committed
        before this returns after a preemption notice or with ``persist_now`` (an injected failure follows)."""
        persist_now = persist_now or self.watch.noticed
        if self.rank != 0:
            self.session.report(report, None, persist_now=persist_now)
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(folder, state_of(), self.record)
            if any(self.plots_folder.iterdir()):
                shutil.copytree(self.plots_folder, Path(folder) / checkpoint.PLOTS_FOLDER)
            self.session.report(report, folder, persist_now=persist_now)

    def diverged(self, reason: str) -> None:
        """One more report, the last one's metrics with ``diverged``: the reason (it reaches a sweep through
        Tune's results)."""
        self.session.report({**self.last, DIVERGED: reason}, None)


class PreemptionCheckpointer:
    """``engine.fit``'s mid-epoch hook: asks for a preemption notice (every ``ray.preemption_check_steps`` steps,
    on every rank alike); on a notice seen here, rank 0 checkpoints the state within the epoch (the step and the
    epoch's running sums, ``checkpoint.MID_EPOCH_FORMAT``), stored before training goes on; from then on every
    epoch's end is checkpointed (``EpochReporter``, which also asks at each epoch's end). The report
    repeats the last epoch's metrics with ``PREEMPTION_STEP``: it is no epoch (whoever reads reports skips it),
    and it ranks below every epoch's checkpoint (``MID_EPOCH_RANK``)."""

    def __init__(self, reporter: EpochReporter) -> None:
        self.reporter, self.watch = reporter, reporter.watch

    def __call__(self, progress: engine.EpochProgress, training: engine.Training) -> None:
        if self.watch.noticed:  # seen here before, or at an epoch's end, whose checkpoint followed it
            return
        injected, rank = self.reporter.argument.faults, self.reporter.rank
        faults.held_until_notice(injected, progress.epoch, progress.step, rank, self.watch.check)
        if not self.watch.check():
            return
        report = _checkpointed({**self.reporter.last, PREEMPTION_STEP: progress.step}, MID_EPOCH_RANK)
        config = to_dict(self.reporter.argument.config)
        self.reporter.report_checkpoint(report, lambda: checkpoint.capture(training, progress.epoch - 1, config,
                                                                           progress))
        if rank == 0:
            print(f"[preemption] a node of this run is being reclaimed: checkpointed within epoch {progress.epoch} "
                  f"after step {progress.step}")
        faults.hold_until_gone(injected, progress.epoch, progress.step, rank)


def restored(argument: WorkerArgument, session: Session) -> tuple[dict | None, RunRecord]:
    """The training state and record of the session's last checkpoint (``None`` and a new record without one).
    A checkpoint of another run (a PBT/PB2 exploit) continues that run's lineage in this run's record."""
    found = session.last_checkpoint()
    record = RunRecord(argument.run_id, argument.run_key, argument.identity)
    if found is None:
        return None, record
    with found.as_directory() as folder:
        state, record = checkpoint.load(folder), checkpoint.load_record(folder)
        # a donor's checkpoint (an exploit): which one, and the state's digest, for the lineage
        source = {} if record.run_id == argument.run_id else {
            "donor_checkpoint": argument.start_checkpoint or found.path,  # the URI a segment started from
            "donor_state_sha256": sha256_of(Path(folder) / checkpoint.STATE_FILE)}
    if record.run_id != argument.run_id and record.run_key == argument.run_key:
        raise RuntimeError(f"the checkpoint of run {record.run_key} belongs to MLflow run {record.run_id}, "
                           f"which this tracking store does not hold: point tracking.tracking_uri at the store "
                           f"that holds it, or start a fresh run")
    if record.run_id != argument.run_id:  # another run's weights: a PBT/PB2 exploit
        print(f"[pbt] continuing from run {record.run_id}'s checkpoint after epoch {record.epoch}")
        record = record.continued_by(argument.run_id, argument.run_key, argument.identity, source)
    return state, record


def run_worker(argument: WorkerArgument, session: Session) -> str | None:
    """One worker: restore the last checkpoint if any, train, report every epoch on every rank
    (``EpochReporter``); the last checkpoint also holds the embedding and confusion-matrix plots. A non-finite
    loss ends the training on every rank (all see the same global loss) with one more report carrying
    ``diverged``; retrying from the last checkpoint would meet the same NaN. Returns that reason (rank 0's
    return value reaches the driver as the ``Result``'s ``return_value``), else ``None``."""
    config, data = argument.config, argument.dataset
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = session.device()
    state, record = restored(argument, session)
    monitor_key = monitor_source(config.eval) if data.num_val else None
    if record.trained_every_epoch(config.optim.epochs):  # restored after its last epoch: report it again
        session.report(record.report(monitor_key), None)
        return None
    plots_folder = Path(tempfile.mkdtemp(prefix="varcon-plots-"))
    watch = PreemptionWatch(session)
    reporter = EpochReporter(argument, session, record, monitor_key, plots_folder, state is not None, watch)
    within = state.get("progress") if state else None
    if within is not None and session.rank() == 0:
        print(f"[resume] within epoch {within['epoch']} after step {within['step']}")

    def on_final_features(final: FinalFeatures) -> None:
        _draw_final_plots(final, data.num_classes, plots_folder)

    try:
        engine.fit(config, data, device, reporter, wrap_model=session.wrap_model, resume=state,
                   on_final_features=on_final_features if session.rank() == 0 else None,
                   mid_epoch=PreemptionCheckpointer(reporter), mid_epoch_every=config.ray.preemption_check_steps)
    except engine.NonFiniteLossError as exc:
        reporter.diverged(str(exc))
        return str(exc)
    finally:
        shutil.rmtree(plots_folder, ignore_errors=True)
    return None


def _draw_final_plots(final: FinalFeatures, num_classes: int, folder: Path) -> None:
    """PCA and t-SNE of the final split's features, and the kNN confusion matrix, as PNGs in ``folder``. Plots
    are a by-product: a failure is reported, never raised."""
    try:
        features, labels = final.features.numpy(), final.labels.numpy()
        for method in ("pca", "tsne"):
            plots.embedding_plot(features, labels, method, folder / f"embedding_{method}.png")
        plots.confusion_matrix_plot(labels, final.knn_predictions.numpy(), num_classes,
                                    folder / "knn_confusion_matrix.png",
                                    f"kNN (k={final.knn_k}) confusion, {final.split} split")
    except Exception as exc:  # noqa: BLE001
        print(f"[plots] could not draw the final plots: {exc}")
