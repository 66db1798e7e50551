"""Faults injected into real trainings under the session's Ray cluster: the run survives or stops cleanly, and
every metric step reaches MLflow exactly once."""
import os
import signal
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.train import UserCallback
from ray.util.state import list_actors

from pipeline import checkpoint
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.identity import run_key
from pipeline.names import MODEL_URI_TAG
from pipeline.train_job import TrainingDiverged, checkpoints_in, train

SHORT = ["optim.epochs=3", "optim.warmup_epochs=0", "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]


def only_run(client):
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    return run


def steps(client, run, key):
    return [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def local_store(home):
    return MlflowClient(f"sqlite:///{home / '.cache' / 'mlflow' / 'mlflow.db'}")


@pytest.mark.cluster
def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(varcon_home, ray_session):
    before = {w.actor_id for w in train_workers()}
    config = load_config(None, [*SHORT, "ray.max_failures=1", "name=worker-death"])
    outcome = train(config, callbacks=[KillAfterEpochs({1: kill_a_train_worker})])  # SIGKILL during epoch 2
    assert outcome.final_metrics["epoch"] == 3  # one command, no re-run
    workers = [w for w in train_workers() if w.actor_id not in before]
    assert len(workers) == 4  # the group of 2 workers was replaced once
    client = local_store(varcon_home)
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_id == outcome.run_id
    assert steps(client, run, "train_loss") == [1, 2, 3]
    assert steps(client, run, "val_knn_top1_k20") == [0, 1, 2, 3]


@pytest.mark.cluster
def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(varcon_home, ray_session, capsys,
                                                                            inject_faults):
    inject_faults(nan_after_epoch=1)
    assert main(["train", *SHORT, "name=nan-loss"]) == 1  # no retries of a deterministic failure
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("varcon:")]
    assert err.startswith("varcon: error: training nan-loss-") and "training loss became nan at epoch 2" in err
    client = local_store(varcon_home)
    run = only_run(client)
    assert run.info.status == "FAILED" and "training loss became nan" in run.data.tags["varcon.error"]
    assert steps(client, run, "train_loss") == [1]
    (kept,) = checkpoints_in(varcon_home / ".cache" / "ray_results" / run.data.tags["varcon.run_key"])
    state = checkpoint.load(kept.folder.path)
    assert kept.record.epoch == state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.cluster
def test_divergence_while_the_tracking_server_is_down_still_stops_with_the_reason(
        varcon_home, ray_session, mlflow_server, monkeypatch, inject_faults):
    """The reason travels back through Ray's result, not through the store (the CLI turns it into exit 1, see
    the test above)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (varcon_home / "server").mkdir()
    server = mlflow_server(f"sqlite:///{varcon_home / 'server' / 'mlflow.db'}")
    inject_faults(nan_after_epoch=1)
    config = load_config(None, [*SHORT, "name=nan-offline", "ray.num_workers=1", f"tracking.tracking_uri={server.url}"])
    with pytest.raises(TrainingDiverged, match="training loss became nan at epoch 2.*last good checkpoint: /"):
        train(config, callbacks=[KillAfterEpochs({1: KillProcessGroup(server.process.pid)})])


@pytest.mark.cluster
def test_server_killed_then_worker_killed_then_server_back_logs_every_step_exactly_once(
        varcon_home, ray_session, mlflow_server, monkeypatch, capsys):
    """The tracking server dies after epoch 1 and a worker after epoch 2 (the group restarts from epoch 2's
    checkpoint and trains epoch 3 again); the training finishes, keeping what MLflow did not take in its final
    checkpoint; once the server is back, the same command sends it: every step once, nothing trained again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this driver fails each call at once (workers too)
    (varcon_home / "server").mkdir()
    server = mlflow_server(f"sqlite:///{varcon_home / 'server' / 'mlflow.db'}")
    overrides = [*SHORT, "name=outage", "ray.max_failures=1", f"tracking.tracking_uri={server.url}",
                 "tracking.outage_wait_s=2"]
    config = load_config(None, overrides)
    outcome = train(config, callbacks=[KillAfterEpochs({1: KillProcessGroup(server.process.pid),
                                                        2: kill_a_train_worker})])
    assert outcome.tracking_problem and outcome.model_path in outcome.tracking_problem  # the model is kept
    final = checkpoints_in(varcon_home / ".cache" / "ray_results" / run_key(config))[-1]
    assert final.record.epoch == 3 and sorted({e[0] for e in final.record.entries}) == [0, 1, 2, 3]

    server.stop()
    server.start()  # back, same store and port: the same command completes the run
    assert main(["train", *overrides]) == 0
    assert "has trained all 3 epochs already" in capsys.readouterr().out
    client = MlflowClient(server.url)
    run = only_run(client)
    assert run.info.status == "FINISHED" and MODEL_URI_TAG in run.data.tags
    assert steps(client, run, "train_loss") == [1, 2, 3]
    assert steps(client, run, "val_knn_top1_k20") == [0, 1, 2, 3]
    assert steps(client, run, "test_probe_top1") == [3]
    assert len(checkpoints_in(varcon_home / ".cache" / "ray_results" / run_key(config))) == 2  # none added


def train_workers():
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)


def kill_a_train_worker():
    (victim, *_) = [w for w in train_workers() if w.state == "ALIVE"]
    os.kill(victim.pid, signal.SIGKILL)


class KillProcessGroup:
    def __init__(self, process_group: int) -> None:
        self.process_group = process_group

    def __call__(self):
        os.killpg(self.process_group, signal.SIGKILL)


class KillAfterEpochs(UserCallback):
    """Runs ``kills[epoch]`` once the workers have reported ``epoch``. Runs in Ray Train's controller actor,
    which cannot import this test module: it travels by value."""

    def __init__(self, kills: dict) -> None:
        self.kills = dict(kills)

    def after_report(self, run_context, metrics, checkpoint):
        kill = self.kills.pop(metrics[0]["epoch"], None)
        if kill is not None:
            kill()


cloudpickle.register_pickle_by_value(sys.modules[__name__])
