"""Ray Train V2 glue: the only module that talks to Ray Train.

``run_training`` builds a ``TorchTrainer`` from the config (workers, CPU/GPU, storage) and fits it; every worker
runs ``train_loop_per_worker``, which hands the plain-PyTorch engine a DDP wrapper and a per-epoch callback that
logs to MLflow (rank 0 only) and reports to Ray (every rank, once per epoch).

The loop itself (``run_worker``) only needs a small ``Session`` (report, last checkpoint, rank, device, model
wrapper), so a single-process Ray Tune trial (population-based training, ``tune/``) runs the same code.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch

from pipeline import checkpoint, engine
from pipeline.config import ExperimentConfig, from_dict, resolve_path, to_dict
from pipeline.data.ffcv_writer import DatasetFiles

TEST_HOOKS = ("VARCON_TEST_FAIL_AT_EPOCH", "VARCON_TEST_NAN_AFTER_EPOCH", "VARCON_TEST_TRIAL")
MONITOR = "monitor_top1"  # the latest kNN top-1 (first eval.knn_k): ranks checkpoints, drives early stopping
STOPPED_PREFIX = "stopped: "  # a varcon.error value for a training that ended itself (non-finite loss)
EXPLOITS_TAG = "varcon.exploits"  # JSON list of {epoch, donor_run_id}: checkpoints this run continued from


class Session(Protocol):
    """What the training loop needs from Ray (Train or Tune)."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...
    def last_checkpoint_state(self) -> dict | None: ...
    def rank(self) -> int: ...
    def device(self) -> torch.device: ...
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


class RayTrainSession:
    """A worker of a ``TorchTrainer``: DDP-prepared model, reports through ``ray.train``."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        found = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=found)

    def last_checkpoint_state(self) -> dict | None:
        import ray.train

        return checkpoint_state(ray.train.get_checkpoint())

    def rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


def checkpoint_state(found) -> dict | None:
    """The training state inside a Ray (Train or Tune) ``Checkpoint``, or ``None`` for no checkpoint."""
    if found is None:
        return None
    with found.as_directory() as folder:
        return checkpoint.load(folder)


def test_hooks_from_env() -> dict[str, str]:
    """The test hooks set in this process's environment (see ``_injected_failure``). Ray workers and Tune
    trials do not see variables set after the cluster started, so the driver reads them and passes them on."""
    return {key: os.environ[key] for key in TEST_HOOKS if key in os.environ}


def _injected_failure(hooks: dict, epoch: int, resumed: bool, training: engine.Training) -> None:
    """Test hooks, set in the driver's environment. ``VARCON_TEST_FAIL_AT_EPOCH=k`` makes rank 0 raise once,
    after epoch k's checkpoint of a fresh start. ``VARCON_TEST_NAN_AFTER_EPOCH=k`` puts a NaN into the weights
    after epoch k's checkpoint, so the next epoch's loss is not finite. In a sweep, ``VARCON_TEST_TRIAL=n``
    confines the hooks to the n-th trial (``tune.trainables.hooks_for_trial``). Killing processes is left to
    the tests themselves (``tests/test_faults.py``).
    """
    if hooks.get("VARCON_TEST_NAN_AFTER_EPOCH") == str(epoch):
        with torch.no_grad():
            next(engine.unwrap(training.model).parameters()).fill_(float("nan"))
    if not resumed and hooks.get("VARCON_TEST_FAIL_AT_EPOCH") == str(epoch):
        raise RuntimeError(f"injected failure after epoch {epoch} (VARCON_TEST_FAIL_AT_EPOCH)")


def loop_config(config: ExperimentConfig, files: DatasetFiles, tracking_uri: str, run_id: str,
                run_folder: str, test_hooks: dict[str, str] | None = None) -> dict:
    """The plain-data argument of ``run_worker`` (it crosses process boundaries); ``test_hooks`` default to
    this process's environment."""
    return {"experiment": to_dict(config), "dataset": asdict(files), "tracking_uri": tracking_uri,
            "run_id": run_id, "run_folder": run_folder,
            "test_hooks": test_hooks_from_env() if test_hooks is None else test_hooks}


def run_worker(loop: dict, session: Session) -> str | None:
    """One worker: restore the last checkpoint if any, train, report every epoch on every rank.

    Rank 0 writes a checkpoint every ``ray.checkpoint_every`` epochs and at the end. The metrics of the epochs
    up to a checkpoint go to MLflow just before it is reported (Tune may stop or exploit the trial inside that
    report); epochs a restart redoes are not logged again (steps up to the run's last logged one are skipped).
    After the final epoch rank 0 logs the embedding and confusion-matrix plots; metrics the tracking store
    still has not taken after ``tracking.outage_wait_s`` go to ``<run folder>/unlogged_metrics.json``. Returns
    why the training stopped early (a non-finite loss), else ``None``.
    """
    from pipeline.tracking import ERROR_TAG, TrackedRun, save_unsent

    config = from_dict(loop["experiment"])
    files = DatasetFiles(**loop["dataset"])
    rank = session.rank()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = session.device()
    resume = session.last_checkpoint_state()
    run_id = loop["run_id"]
    tracked = TrackedRun(loop["tracking_uri"], run_id) if rank == 0 else None
    logged_through = tracked.last_step("train_loss") if tracked is not None and resume is not None else -1
    if tracked is not None and resume is not None and resume.get("tracking_run_id") not in ("", run_id):
        _record_exploit(tracked, resume)
    unlogged: list[tuple[int, dict]] = []
    monitor_key = f"knn_top1_k{config.eval.knn_k[0]}"
    monitor = {MONITOR: float("-inf")}

    def on_epoch_end(epoch: int, metrics: dict, training: engine.Training) -> None:
        unlogged.append((epoch, metrics))
        if monitor_key in metrics:
            monitor[MONITOR] = metrics[monitor_key]
        report = {**metrics, **monitor, "epoch": epoch}
        due = epoch > 0 and (epoch % config.ray.checkpoint_every == 0 or epoch == config.optim.epochs)
        if due and tracked is not None:
            for logged_epoch, logged in unlogged:
                if logged_epoch > logged_through:
                    tracked.log_metrics(logged, step=logged_epoch)
            tracked.flush(timeout_s=30, while_failing=False)  # an outage does not hold the training
        if due:
            unlogged.clear()
        if due and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                state = checkpoint.capture(training, epoch, run_id)
                state["config"] = loop["experiment"]
                checkpoint.save(state, folder)
                session.report(report, folder)
        else:
            session.report(report, None)
        if rank == 0:
            _injected_failure(loop["test_hooks"], epoch, resume is not None, training)

    def on_final_features(final: engine.FinalFeatures) -> None:
        _log_final_plots(tracked, final, files.num_classes)

    stopped = None
    try:
        engine.fit(config, files, device, on_epoch_end, wrap_model=session.wrap_model, resume=resume,
                   on_final_features=on_final_features if rank == 0 else None)
    except engine.NonFiniteLossError as exc:
        # Every rank sees the same (global) loss, so all stop at the same epoch. Retrying from the last
        # checkpoint would meet the same NaN: end cleanly instead, keeping that checkpoint and saying why.
        stopped = f"{STOPPED_PREFIX}{exc}"
        if tracked is not None:
            tracked.set_tags({ERROR_TAG: stopped})
    if tracked is not None:
        unsent = tracked.flush(timeout_s=config.tracking.outage_wait_s)
        if unsent:
            path = save_unsent(unsent, loop["run_folder"])
            print(f"[tracking] {len(unsent)} epochs of metrics could not reach MLflow; kept in {path} until the "
                  f"same command runs again")
    return stopped


def _record_exploit(tracked, state: dict) -> None:
    """A checkpoint written by another run (a PBT/PB2 exploit): append ``{epoch, donor_run_id}`` to the run's
    ``varcon.exploits`` tag, which traces the weights' lineage (and so the temperature schedule they saw)."""
    exploits = json.loads(tracked.tags().get(EXPLOITS_TAG, "[]"))
    exploits.append({"epoch": state["epoch"], "donor_run_id": state["tracking_run_id"]})
    tracked.set_tags({EXPLOITS_TAG: json.dumps(exploits)})
    print(f"[pbt] continuing from run {state['tracking_run_id']}'s checkpoint after epoch {state['epoch']}")


def _log_final_plots(tracked, final: engine.FinalFeatures, num_classes: int) -> None:
    """PCA and t-SNE of the test features, and the kNN confusion matrix, as ``plots/*.png``. A tracking
    outage costs the plots, never the training."""
    from pipeline import plots

    with tempfile.TemporaryDirectory() as folder:
        try:
            features, labels = final.features.numpy(), final.labels.numpy()
            for method in ("pca", "tsne"):
                plots.embedding_plot(features, labels, method, Path(folder) / f"embedding_{method}.png")
            plots.confusion_matrix_plot(labels, final.knn_predictions.numpy(), num_classes,
                                        Path(folder) / "knn_confusion_matrix.png",
                                        f"kNN (k={final.knn_k}) confusion, test split")
            tracked.log_artifacts(folder, "plots")
        except Exception as exc:  # noqa: BLE001 - plots are a by-product; report and go on
            print(f"[tracking] could not log the final plots: {exc}")


def train_loop_per_worker(loop: dict) -> None:
    run_worker(loop, RayTrainSession())


def run_training(config: ExperimentConfig, files: DatasetFiles, tracking_uri: str, run_id: str, run_name: str,
                 callbacks: list | None = None, test_hooks: dict[str, str] | None = None):
    """Fit under Ray Train; returns Ray's ``Result`` (``.metrics``: rank 0's last report, ``.checkpoint``: the
    last one, ``.best_checkpoints``: ranked by ``monitor_top1``).

    Running again with the same ``run_name`` and storage path continues from the last checkpoint.
    ``callbacks`` go to the ``RunConfig`` (a Tune trial passes Ray's ``TuneReportCallback``); ``test_hooks``
    to the workers (default: this process's environment).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = config.ray
    storage = resolve_path(r.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config, files, tracking_uri, run_id, str(storage / run_name),
                                      test_hooks),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker, "GPU": int(r.use_gpu)},
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=str(storage), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=MONITOR,
                                                                checkpoint_score_order="max")),
    )
    return trainer.fit()


_started_locally = False  # init_ray started a private instance (no autoscaler can add nodes to it)


def init_ray() -> None:
    """Connect to the cluster in ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start a local instance."""
    global _started_locally
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, log_to_driver=True)
        _started_locally = not address


def require_resources(cpus: float, gpus: float, wait_s: float, log=print) -> dict:
    """The cluster's resources once they hold ``cpus`` CPUs and ``gpus`` GPUs. On a running cluster the
    autoscaler gets ``wait_s`` seconds to add nodes; then (and at once on a local instance) a ``ConfigError``
    names the shortfall, instead of a run that waits forever."""
    import time

    import ray

    from pipeline.config import ConfigError

    deadline = time.monotonic() + (0.0 if _started_locally else wait_s)
    announced = False
    while True:
        have = ray.cluster_resources()
        if have.get("CPU", 0.0) >= cpus and have.get("GPU", 0.0) >= gpus:
            return have
        if time.monotonic() >= deadline:
            raise ConfigError(f"the run needs {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has "
                              f"{have.get('CPU', 0.0):g} CPUs and {have.get('GPU', 0.0):g} GPUs: lower ray.num_workers "
                              f"or ray.cpus_per_worker, set ray.use_gpu=false, or add nodes")
        if not announced:
            log(f"waiting up to {wait_s:g} s (ray.resource_wait_s) for the cluster to offer {cpus:g} CPUs and "
                f"{gpus:g} GPUs")
            announced = True
        time.sleep(5)
