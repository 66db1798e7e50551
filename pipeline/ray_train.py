"""Ray Train V2 glue: the only module that talks to Ray Train.

``run_training`` builds a ``TorchTrainer`` from the config (workers, CPU/GPU, storage) and fits it; every worker
runs ``train_loop_per_worker``, which hands the plain-PyTorch engine a DDP wrapper and a per-epoch callback that
logs to MLflow (rank 0 only) and reports to Ray (every rank, once per epoch).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict

import torch

from pipeline import checkpoint, engine
from pipeline.config import ExperimentConfig, from_dict, resolve_path, to_dict
from pipeline.data.ffcv_writer import DatasetFiles


TEST_HOOKS = ("VARCON_TEST_FAIL_AT_EPOCH", "VARCON_TEST_FAIL_MODE")


def _injected_failure(hooks: dict, epoch: int, resumed: bool) -> None:
    """Test hook: ``VARCON_TEST_FAIL_AT_EPOCH=k`` in the driver's environment makes rank 0 fail once, after
    epoch k of a fresh start (``VARCON_TEST_FAIL_MODE``: ``raise`` an exception, or ``exit`` the process).
    """
    if resumed or hooks.get("VARCON_TEST_FAIL_AT_EPOCH") != str(epoch):
        return
    if hooks.get("VARCON_TEST_FAIL_MODE", "raise") == "exit":
        os._exit(17)
    raise RuntimeError(f"injected failure after epoch {epoch} (VARCON_TEST_FAIL_AT_EPOCH)")


def train_loop_per_worker(loop_config: dict) -> None:
    """One DDP worker: restore the last checkpoint if any, train, report every epoch on every rank.

    Rank 0 writes a checkpoint every ``ray.checkpoint_every`` epochs and at the end, and logs the metrics of
    the epochs up to that checkpoint to MLflow right after it is persisted: epochs a restart will redo are
    never logged twice.
    """
    import ray.train
    import ray.train.torch

    from pipeline.tracking import TrackedRun

    config = from_dict(loop_config["experiment"])
    files = DatasetFiles(**loop_config["dataset"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    restored = ray.train.get_checkpoint()
    resume = None
    if restored is not None:
        with restored.as_directory() as folder:
            resume = checkpoint.load(folder)
    run_id = loop_config["run_id"]
    tracked = TrackedRun(loop_config["tracking_uri"], run_id) if rank == 0 else None
    unlogged: list[tuple[int, dict]] = []

    def on_epoch_end(epoch: int, metrics: dict, training: engine.Training) -> None:
        unlogged.append((epoch, metrics))
        due = epoch > 0 and (epoch % config.ray.checkpoint_every == 0 or epoch == config.optim.epochs)
        if due and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                state = checkpoint.capture(training, epoch, run_id)
                state["config"] = loop_config["experiment"]
                checkpoint.save(state, folder)
                ray.train.report({**metrics, "epoch": epoch},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report({**metrics, "epoch": epoch})
        if due and tracked is not None:
            for logged_epoch, logged in unlogged:
                tracked.log_metrics(logged, step=logged_epoch)
        if due:
            unlogged.clear()
        if rank == 0:
            _injected_failure(loop_config["test_hooks"], epoch, resumed=resume is not None)

    engine.fit(config, files, device, on_epoch_end, wrap_model=ray.train.torch.prepare_model, resume=resume)


def run_training(config: ExperimentConfig, files: DatasetFiles, tracking_uri: str, run_id: str, run_name: str):
    """Fit under Ray Train; returns Ray's ``Result`` (``.metrics``: rank 0's last report, ``.checkpoint``).

    Running again with the same ``run_name`` and storage path continues from the last checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = config.ray
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_dict(config), "dataset": asdict(files),
                           "tracking_uri": tracking_uri, "run_id": run_id,
                           "test_hooks": {key: os.environ[key] for key in TEST_HOOKS if key in os.environ}},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker, "GPU": int(r.use_gpu)},
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=str(resolve_path(r.storage_path)),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def init_ray() -> None:
    """Connect to the cluster in ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start a local instance."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
