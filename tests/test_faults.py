"""Faults injected into real trainings under the session's Ray cluster: the run survives or stops cleanly."""
import torch
from mlflow.tracking import MlflowClient

from pipeline import checkpoint
from pipeline.cli import main

SHORT = ["optim.epochs=3", "optim.warmup_epochs=0", "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]


def only_run(home):
    client = MlflowClient(f"sqlite:///{home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    return client, run


def test_a_dead_worker_process_is_replaced_and_the_run_finishes(varcon_home, ray_session, monkeypatch):
    monkeypatch.setenv("VARCON_TEST_FAIL_AT_EPOCH", "2")
    monkeypatch.setenv("VARCON_TEST_FAIL_MODE", "exit")  # rank 0's process exits, as on a lost node
    assert main(["train", *SHORT, "ray.max_failures=1", "name=worker-death"]) == 0  # one command, no re-run
    client, run = only_run(varcon_home)
    assert run.info.status == "FINISHED"
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
