"""Ray Train V2 glue: the worker process's entry, its ``Session`` and the ``TorchTrainer`` of a run. With
``pipeline.ray_callbacks`` (the callbacks in Ray Train's controller), the only modules that import Ray Train.

``run_training`` builds a ``TorchTrainer`` from the config (workers, CPU/GPU, storage, checkpoints kept) and fits
it; every worker runs ``train_loop_per_worker``, which hands ``pipeline.worker.run_worker`` a ``RayTrainSession``
(a DDP-prepared model, reports through ``ray.train``). Metrics reach MLflow from the controller
(``RecordForwarder``) once a checkpoint covers them, so a restart (which replays epochs after the last checkpoint)
never logs a step twice. ``kept_checkpoints`` reads which checkpoints Ray registered for a run folder.
"""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pipeline import faults
from pipeline.config import ExperimentConfig
from pipeline.names import CHECKPOINT_RANK, EPOCH
from pipeline.storage import Location
from pipeline.worker import WorkerArgument, monitored, run_worker

if TYPE_CHECKING:
    from ray.train import Checkpoint, CheckpointConfig, Result
    from ray.util.queue import Queue


class RayTrainSession:
    """A worker of a ``TorchTrainer``: DDP-prepared model, reports through ``ray.train``. With
    ``upload_async`` every rank reports with ``CheckpointUploadMode.ASYNC``, so no rank waits at the report
    barrier while rank 0's checkpoint uploads; the report reaches the controller (and ``RecordForwarder``) once
    the checkpoint is persisted, in order. ``persist_now`` (a preemption notice) reports synchronously and returns
    once the controller has committed the checkpoint (Ray's ``get_all_reported_checkpoints``): a report the
    controller has not yet taken in dies with the node, and the run would restart from the one before.
    ``injected``: the run's faults (``pipeline.faults``; a test's held upload). ``start_checkpoint``: the checkpoint
    (a path or URI) ``last_checkpoint`` gives while the run has none of its own (``WorkerArgument``)."""

    def __init__(self, upload_async: bool = False, injected: dict | None = None, start_checkpoint: str = "") -> None:
        self.upload_async, self.injected, self.start_checkpoint = upload_async, injected or {}, start_checkpoint

    def report(self, metrics: dict, checkpoint_dir: str | None, persist_now: bool = False) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if not self.upload_async or persist_now:
            found = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=found)
            if persist_now:  # uploaded is not enough: the controller must have registered it before the node goes
                from ray.train import CheckpointConsistencyMode

                ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            return
        found = None
        if checkpoint_dir:  # the caller deletes its folder on return: hand Ray the files under another name
            staged = tempfile.mkdtemp(prefix="varcon-upload-")
            os.rmdir(staged)
            os.rename(checkpoint_dir, staged)
            os.mkdir(checkpoint_dir)
            found = ray.train.Checkpoint.from_directory(staged)  # Ray deletes it once uploaded
        epoch = metrics.get(EPOCH, 0)
        held = faults.held_upload(self.injected, epoch) if found else None
        ray.train.report(metrics, checkpoint=found, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=_held_upload(*held) if held else None)
        if found:
            faults.handed_over(self.injected, epoch)

    def preemption_notice(self) -> bool:
        """Ray Train's ``get_preemption_info`` (rank 0's answer, broadcast): a node of the run is draining for
        preemption (``pipeline.spot_watcher`` drains a spot node on EC2's notice)."""
        import ray.train

        return ray.train.get_preemption_info() is not None

    def last_checkpoint(self) -> Checkpoint | None:
        import ray.train

        own = ray.train.get_checkpoint()  # the run's own latest: after a worker failure within this run
        if own is None and self.start_checkpoint:
            return ray.train.Checkpoint(self.start_checkpoint)
        return own

    def rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


def _held_upload(before: Callable[[], None], after: Callable[[str], None]) -> Callable:
    """A ``checkpoint_upload_fn`` that stores the checkpoint as Ray would, between a test's ``before()`` and
    ``after(run key)`` (``faults.held_upload``)."""

    def upload(checkpoint: Checkpoint, name: str) -> Checkpoint:
        import ray.train

        context = ray.train.get_context()
        before()
        persisted = context.get_storage().persist_current_checkpoint(checkpoint, name)
        after(context.get_experiment_name())
        return persisted

    return upload


def kept_checkpoints(run_folder: Location) -> list[Location]:
    """The folders of the checkpoints Ray Train registered for the run stored in ``run_folder`` (the latest and
    the best by the monitor, ``CheckpointConfig``), read with Ray's own ``Result.from_path`` on the folder's
    filesystem; none when there is no such run. A folder that a failed attempt wrote but Ray never registered is
    not among them: Ray does not restore from it, so nothing may be read from it."""
    import logging

    from ray.train import Result

    if not (run_folder / "checkpoint_manager_snapshot.json").is_file():
        return []
    logger = logging.getLogger("ray.train")
    level = logger.level
    logger.setLevel(logging.ERROR)  # from_path warns that a new run would need a new name: not ours to say
    try:
        result = Result.from_path(run_folder.path, storage_filesystem=run_folder.filesystem)
    finally:
        logger.setLevel(level)
    found = [c.path for c, _ in result.best_checkpoints or []]
    if result.checkpoint is not None and result.checkpoint.path not in found:
        found.append(result.checkpoint.path)
    return [run_folder.on_same(path) for path in found]


def train_loop_per_worker(argument: WorkerArgument) -> str | None:
    import ray.train

    if argument.config.data.loader == "ffcv":  # each trial's workers are new processes
        from pipeline.data.ffcv_loader import reuse_for_dataset

        reuse_for_dataset(argument.dataset.train)
    context = ray.train.get_context()
    node = f"node{context.get_node_rank()}-{socket.gethostname()}"
    with monitored(argument, context.get_local_rank(), node):
        upload_async = argument.config.ray.checkpoint_upload == "async"
        # rank 0's return value: the Result's ``return_value``
        return run_worker(argument, RayTrainSession(upload_async, argument.faults, argument.start_checkpoint))


def run_training(config: ExperimentConfig, argument: WorkerArgument, run_name: str, storage_path: str,
                 callbacks: list | tuple = (), console_queue: Queue | None = None,
                 metrics_before_next: bool = False) -> Result:
    """Fit under Ray Train as the run ``run_name`` (its folder in ``storage_path``); returns Ray's ``Result``
    (``.return_value``: why the loss diverged, else ``None``; ``.checkpoint``: the last one). Running again with the
    same ``run_name`` and storage path continues from the run's last checkpoint. The controller forwards metrics to
    MLflow (``RecordForwarder``; ``metrics_before_next``: each checkpoint's before the next report) and, given a
    ``console_queue`` (``pipeline.console.report_queue``), rank 0's reports to it; ``callbacks`` follow (a Tune
    trial passes ``pipeline.ray_callbacks.TrialReportSender``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_callbacks import RecordForwarder, ReportSender

    r = config.ray
    own = [RecordForwarder(argument.tracking_uri, metrics_before_next)]
    if console_queue is not None:  # a Ray queue is falsy while empty (its __len__)
        own.append(ReportSender(console_queue))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=argument,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker, "GPU": int(r.use_gpu)},
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=[*own, *callbacks],
                             failure_config=FailureConfig(max_failures=r.max_failures,
                                                          max_preemption_failures=r.max_preemption_failures),
                             checkpoint_config=_checkpoint_config()),
    )
    return trainer.fit()


def _checkpoint_config() -> CheckpointConfig:
    """Keep the best two checkpoints by ``CHECKPOINT_RANK`` (Ray always keeps the latest too): the validation
    monitor, or without a validation split the epoch (the latest two). A mid-epoch checkpoint ranks below every
    epoch's: it is the latest until the next epoch's checkpoint, then it goes once two epochs rank above it."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_RANK, checkpoint_score_order="max")
