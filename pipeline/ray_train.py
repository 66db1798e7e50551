"""Ray Train V2 glue: the only module that talks to Ray Train.

``run_training`` builds a ``TorchTrainer`` from the config (workers, CPU/GPU, storage) and fits it; every worker
runs ``run_worker``, which hands the plain-PyTorch engine a DDP wrapper and a per-epoch callback that reports to
Ray on every rank, once per epoch. Workers do not talk to MLflow: rank 0 writes each checkpoint with the run's
``RunRecord`` (every metric value so far), and ``RecordForwarder``, a callback in Ray Train's controller, sends
each persisted checkpoint's new entries to MLflow from the report stream. Metrics therefore reach MLflow only once
a checkpoint covers them, and a restart (which replays epochs after the last checkpoint) never logs a step twice.

The loop only needs a small ``Session`` (report, last checkpoint, rank, device, model wrapper), so a
single-process Ray Tune trial (population-based training, ``tune/``) runs the same code.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

from pipeline import checkpoint, engine, faults, plots, system_metrics
from pipeline.checkpoint import RunRecord
from pipeline.config import ExperimentConfig, from_dict, to_dict
from pipeline.data.prepare import PreparedDataset
from pipeline.evaluator import FinalFeatures
from pipeline.models import unwrap
from pipeline.names import DIVERGED, MONITOR, monitor_source
from pipeline.storage import Location
from pipeline.tracking import MetricSender, TrackedRun, resolve_tracking_uri


class Session(Protocol):
    """What the training loop needs from Ray (Train or Tune)."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...
    def last_checkpoint(self): ...  # a Ray ``Checkpoint`` or None
    def rank(self) -> int: ...
    def device(self) -> torch.device: ...
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


class RayTrainSession:
    """A worker of a ``TorchTrainer``: DDP-prepared model, reports through ``ray.train``. With
    ``upload_async`` every rank reports with ``CheckpointUploadMode.ASYNC``, so no rank waits at the report
    barrier while rank 0's checkpoint uploads; the report reaches the controller (and ``RecordForwarder``) once
    the checkpoint is persisted, in order."""

    def __init__(self, upload_async: bool = False) -> None:
        self.upload_async = upload_async

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if not self.upload_async:
            found = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=found)
            return
        found = None
        if checkpoint_dir:  # the caller deletes its folder on return: hand Ray the files under another name
            staged = tempfile.mkdtemp(prefix="varcon-upload-")
            os.rmdir(staged)
            os.rename(checkpoint_dir, staged)
            os.mkdir(checkpoint_dir)
            found = ray.train.Checkpoint.from_directory(staged)  # Ray deletes it once uploaded
        ray.train.report(metrics, checkpoint=found, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    def last_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


def read_record(found) -> RunRecord:
    """The ``RunRecord`` of a Ray (Train or Tune) ``Checkpoint``, read through its own filesystem (local, shared
    or a bucket) without fetching the weights."""
    with found.filesystem.open_input_stream(f"{found.path}/{checkpoint.RECORD_FILE}") as stream:
        return RunRecord.from_json(stream.read().decode())


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


def worker_argument(config: ExperimentConfig, data: PreparedDataset, run_id: str, run_key: str,
                    identity: str) -> dict:
    """The plain-data argument of ``run_worker`` (it crosses process boundaries), with the faults a test
    injects into this run (``pipeline.faults``)."""
    return {"experiment": to_dict(config), "dataset": data.as_dict(), "run_id": run_id, "run_key": run_key,
            "identity": identity, "faults": faults.for_run(run_key),
            "tracking_uri": resolve_tracking_uri(config.tracking.tracking_uri)}


def monitored(argument: dict, local_rank: int, node: str | None = None):
    """The node's system-metrics monitor around a worker's training, on the worker of local rank 0 when
    ``tracking.system_metrics`` asks for it (``pipeline.system_metrics``); else nothing."""
    t, use_gpu = argument["experiment"]["tracking"], argument["experiment"]["ray"]["use_gpu"]
    if local_rank != 0 or not system_metrics.enabled(t["system_metrics"], use_gpu):
        return contextlib.nullcontext()
    return system_metrics.node_monitor(argument["run_id"], argument["tracking_uri"], t["system_metrics_interval_s"],
                                       node)


def run_worker(argument: dict, session: Session) -> str | None:
    """One worker: restore the last checkpoint if any, train, report every epoch on every rank.

    Rank 0 writes a checkpoint (``state.pt`` and the ``RunRecord``) every ``ray.checkpoint_every`` epochs and
    at the end; the last one also holds the embedding and confusion-matrix plots. A checkpoint of another run
    (a PBT/PB2 exploit) continues that run's lineage in this run's record. A non-finite loss ends the training
    on every rank (all see the same global loss) with one more report carrying ``diverged``: the reason, which
    reaches a sweep through Tune's results; retrying from the last checkpoint would meet the same NaN. Returns
    that reason (rank 0's return value reaches the driver as the ``Result``'s ``return_value``), else ``None``.
    """
    config = from_dict(argument["experiment"])
    data = PreparedDataset.from_dict(argument["dataset"])
    rank = session.rank()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = session.device()
    found = session.last_checkpoint()
    state, record = None, RunRecord(argument["run_id"], argument["run_key"], argument["identity"])
    if found is not None:
        with found.as_directory() as folder:
            state, record = checkpoint.load(folder), checkpoint.load_record(folder)
        if record.run_id != argument["run_id"] and record.run_key == argument["run_key"]:
            raise RuntimeError(f"the checkpoint of run {record.run_key} belongs to MLflow run {record.run_id}, "
                               f"which this tracking store does not hold: point tracking.tracking_uri at the store "
                               f"that holds it, or start a fresh run")
        if record.run_id != argument["run_id"]:  # another run's weights: a PBT/PB2 exploit
            print(f"[pbt] continuing from run {record.run_id}'s checkpoint after epoch {record.epoch}")
            record = record.continued_by(argument["run_id"], argument["run_key"], argument["identity"])
    monitor_key = monitor_source(config.eval) if data.num_val else None
    last_report = record.report(monitor_key)
    if record.epoch >= config.optim.epochs:  # restored after its last epoch (a restored sweep): report it again
        session.report(last_report, None)
        return None
    plots = Path(tempfile.mkdtemp(prefix="varcon-plots-"))

    def on_epoch_end(epoch: int, metrics: dict, training: engine.Training) -> None:
        record.add(epoch, metrics)
        record.epoch = epoch
        last_report.clear()
        last_report.update(record.report(monitor_key))
        due = epoch > 0 and (epoch % config.ray.checkpoint_every == 0 or epoch == config.optim.epochs)
        if due and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                checkpoint.save(folder, checkpoint.capture(training, epoch, argument["experiment"]), record)
                if any(plots.iterdir()):
                    shutil.copytree(plots, Path(folder) / checkpoint.PLOTS_FOLDER)
                session.report(dict(last_report), folder)
        else:
            session.report(dict(last_report), None)
        if rank == 0:
            faults.after_epoch(argument["faults"], epoch, state is not None, unwrap(training.model))

    def on_final_features(final: FinalFeatures) -> None:
        _draw_final_plots(final, data.num_classes, plots)

    try:
        engine.fit(config, data, device, on_epoch_end, wrap_model=session.wrap_model, resume=state,
                   on_final_features=on_final_features if rank == 0 else None)
    except engine.NonFiniteLossError as exc:
        session.report({**last_report, DIVERGED: str(exc)}, None)
        return str(exc)
    finally:
        shutil.rmtree(plots, ignore_errors=True)
    return None


def _draw_final_plots(final: FinalFeatures, num_classes: int, folder: Path) -> None:
    """PCA and t-SNE of the test features, and the kNN confusion matrix, as PNGs in ``folder``. Plots are a
    by-product: a failure is reported, never raised."""
    try:
        features, labels = final.features.numpy(), final.labels.numpy()
        for method in ("pca", "tsne"):
            plots.embedding_plot(features, labels, method, folder / f"embedding_{method}.png")
        plots.confusion_matrix_plot(labels, final.knn_predictions.numpy(), num_classes,
                                    folder / "knn_confusion_matrix.png", f"kNN (k={final.knn_k}) confusion, test split")
    except Exception as exc:  # noqa: BLE001
        print(f"[plots] could not draw the final plots: {exc}")


class RecordForwarding:
    """Sends the new entries of each persisted checkpoint's ``RunRecord`` to its MLflow run, in the background
    (``MetricSender``: an outage is retried, never blocks). Runs where the report stream arrives: Ray Train's
    controller (``RecordForwarder``) or a sweep's driver (Tune's ``on_checkpoint``). What it cannot send is
    still in the checkpoint: the run's owner re-sends the final record when it finishes the run."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._senders: dict = {}
        self._sent_through: dict[str, int] = {}

    def __getstate__(self) -> dict:  # callbacks are pickled (to the controller, into Tune's state): no threads
        return {"tracking_uri": self.tracking_uri}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tracking_uri"])

    def forward(self, found) -> None:
        record = read_record(found)
        if record.run_id not in self._senders:
            run = TrackedRun(self.tracking_uri, record.run_id)
            self._senders[record.run_id] = MetricSender(lambda batch: run.client.log_batch(run.run_id, metrics=batch))
        self._senders[record.run_id].submit(record.own_entries(self._sent_through.get(record.run_id, -1)))
        self._sent_through[record.run_id] = record.epoch

    def flush(self, timeout_s: float) -> None:
        """Wait, ``timeout_s`` at most in all, until every sender has sent what it holds."""
        deadline = time.monotonic() + timeout_s
        for sender in self._senders.values():
            sender.flush(max(0.0, deadline - time.monotonic()))


def _record_forwarder(tracking_uri: str):
    from ray.train import UserCallback

    class RecordForwarder(UserCallback):
        """``RecordForwarding`` on Ray Train's report stream."""

        def __init__(self) -> None:
            self.forwarding = RecordForwarding(tracking_uri)

        def after_report(self, run_context, metrics, checkpoint=None):
            if checkpoint is not None:
                self.forwarding.forward(checkpoint)

    return RecordForwarder()


def _report_sender(queue):
    from ray.train import UserCallback

    class ReportSender(UserCallback):
        """Puts rank 0's report on a queue the driver reads (the report stream reaches the controller only)."""

        def after_report(self, run_context, metrics, checkpoint=None):
            if metrics:
                try:
                    queue.put_nowait(dict(metrics[0]))
                except Exception:  # noqa: BLE001 - a full or gone queue costs console lines, never the training
                    pass

    return ReportSender()


@contextmanager
def reports_to_driver(on_report):
    """A Ray Train callback whose reports (rank 0's) reach ``on_report`` on the driver, in order: through a queue
    actor (no CPU), drained by a thread here until the block ends."""
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                on_report(queue.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue actor is gone (Ray shut down): nothing more will come
                return

    thread = threading.Thread(target=pump, name="varcon-console", daemon=True)
    thread.start()
    try:
        yield _report_sender(queue)
    finally:
        done.set()
        thread.join(timeout=30)
        queue.shutdown()


def train_loop_per_worker(argument: dict) -> str | None:
    import ray.train

    upload_async = argument["experiment"]["ray"]["checkpoint_upload"] == "async"
    if argument["experiment"]["data"]["loader"] == "ffcv":  # each trial's workers are new processes
        from pipeline.data.ffcv_loader import reuse_for_dataset

        reuse_for_dataset(argument["dataset"]["train"])
    context = ray.train.get_context()
    node = f"node{context.get_node_rank()}-{socket.gethostname()}"
    with monitored(argument, context.get_local_rank(), node):
        return run_worker(argument, RayTrainSession(upload_async))  # rank 0's: the Result's ``return_value``


def run_training(config: ExperimentConfig, argument: dict, run_key: str, storage_path: str, tracking_uri: str,
                 callbacks: list | tuple = ()):
    """Fit under Ray Train; returns Ray's ``Result`` (``.return_value``: why the loss diverged, else ``None``;
    ``.checkpoint``: the last one). Running again with the same ``run_key`` and storage path continues from the
    last checkpoint. ``callbacks`` go to the ``RunConfig`` after the record forwarder (a Tune trial passes
    Ray's ``TuneReportCallback``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = config.ray
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=argument,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker, "GPU": int(r.use_gpu)},
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(name=run_key, storage_path=storage_path,
                             callbacks=[_record_forwarder(tracking_uri), *callbacks],
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=_checkpoint_config(config.data.val_fraction > 0)),
    )
    return trainer.fit()


def _checkpoint_config(has_validation: bool):
    """Keep the best two checkpoints by the validation monitor (and Ray always keeps the latest); without a
    validation split nothing selects: the latest two."""
    from ray.train import CheckpointConfig

    if has_validation:
        return CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=MONITOR, checkpoint_score_order="max")
    return CheckpointConfig(num_to_keep=2)
