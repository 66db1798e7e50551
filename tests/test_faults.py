"""Faults injected into real trainings under the session's Ray cluster: the run survives or stops cleanly."""
import json
import os
import signal
import sys

import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.train import UserCallback
from ray.util.state import list_actors

from pipeline import checkpoint
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.tracking import MODEL_URI_TAG, UNLOGGED_FILE
from pipeline.train_job import run_name, train

SHORT = ["optim.epochs=3", "optim.warmup_epochs=0", "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]


def only_run(home):
    client = MlflowClient(f"sqlite:///{home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    return client, run


def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(varcon_home, ray_session):
    before = {w.actor_id for w in train_workers()}
    config = load_config(None, [*SHORT, "ray.max_failures=1", "name=worker-death"])
    outcome = train(config, callbacks=[KillTrainWorkerAfterEpoch(1)])  # SIGKILL during epoch 2, as on a lost node
    assert outcome.final_metrics["epoch"] == 3  # one command, no re-run
    workers = [w for w in train_workers() if w.actor_id not in before]
    assert len(workers) == 4  # the group of 2 workers was replaced once
    client, run = only_run(varcon_home)
    assert run.info.status == "FINISHED" and run.info.run_id == outcome.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "knn_top1_k20")) == [0, 1, 2, 3]


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(varcon_home, ray_session, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("VARCON_TEST_NAN_AFTER_EPOCH", "1")
    assert main(["train", *SHORT, "name=nan-loss"]) == 1  # no retries of a deterministic failure
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("varcon:")]
    assert err.startswith("varcon: error: training nan-loss-") and "training loss became nan" in err
    client, run = only_run(varcon_home)
    assert run.info.status == "FAILED" and "training loss became nan" in run.data.tags["varcon.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    (folder,) = [p for p in (varcon_home / ".cache" / "ray_results").glob("nan-loss-*/checkpoint_*") if p.is_dir()]
    state = checkpoint.load(folder)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def train_workers():
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)


class KillAfterEpoch(UserCallback):
    """SIGKILLs a process once the workers have reported ``epoch``. Runs in Ray Train's controller actor,
    which cannot import this test module: it travels by value."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_report(self, run_context, metrics, checkpoint):
        if metrics[0]["epoch"] == self.epoch:
            self.kill()


class KillTrainWorkerAfterEpoch(KillAfterEpoch):
    def kill(self):
        (victim, *_) = [w for w in train_workers() if w.state == "ALIVE"]
        os.kill(victim.pid, signal.SIGKILL)


class KillServerAfterEpoch(KillAfterEpoch):
    def __init__(self, epoch: int, process_group: int) -> None:
        super().__init__(epoch)
        self.process_group = process_group

    def kill(self):
        os.killpg(self.process_group, signal.SIGKILL)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_tracking_server_outage_loses_no_metric_and_the_same_command_uploads_them_later(
        varcon_home, ray_session, mlflow_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this driver fails each call at once (workers too)
    store = f"sqlite:///{varcon_home / 'server' / 'mlflow.db'}"
    (varcon_home / "server").mkdir()
    server = mlflow_server(store)
    overrides = [*SHORT, "name=outage", "ray.num_workers=1", f"tracking.tracking_uri={server.url}",
                 "tracking.outage_wait_s=2"]
    config = load_config(None, overrides)
    outcome = train(config, callbacks=[KillServerAfterEpoch(1, server.process.pid)])  # the server dies after epoch 1
    assert outcome.tracking_problem and outcome.model_path in outcome.tracking_problem  # the model is kept
    assert checkpoint.load(outcome.model_path.removesuffix("/state.pt"))["epoch"] == 3
    kept = varcon_home / ".cache" / "ray_results" / run_name(config) / UNLOGGED_FILE
    kept_steps = {entry["step"] for entry in json.loads(kept.read_text())}
    # epochs 0-1 reached the store before it died; the last epoch (over 2 epochs of work after the kill, whose
    # delay is Ray Train's 2 s report polling) did not
    assert 3 in kept_steps and not kept_steps & {0, 1}

    server.stop()
    server.start()  # back, same store and port: the same command completes the run
    assert main(["train", *overrides]) == 0
    assert "metric values an earlier attempt kept" in capsys.readouterr().out
    assert not kept.exists()
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    assert run.info.status == "FINISHED" and MODEL_URI_TAG in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "knn_top1_k20")) == [0, 1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "probe_top1")] == [3]
