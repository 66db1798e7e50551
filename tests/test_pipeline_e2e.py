"""The whole path at a small size: `varcon train` -> FFCV files -> Ray Train (2 gloo workers) -> MLflow.

The shared training places one worker per node of the session's 2-node Ray cluster (strict spread): the
cross-worker gather, the global centroids and the checkpoints written to the shared storage path all cross a
node boundary.
"""
import contextlib
import io
import socket
import subprocess

import mlflow
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from pipeline.cli import main
from pipeline.config import REPO_ROOT, flatten, load_config
from pipeline.data.manifest import read_manifest
from pipeline.tracking import using_tracking_uri

OVERRIDES = ["optim.epochs=2", "optim.warmup_epochs=0", "name=e2e", "tracking.registered_model_name=e2e-encoder",
             "eval.few_shot_episodes=20", "ray.placement_strategy=STRICT_SPREAD", "tracking.system_metrics=always",
             "tracking.system_metrics_interval_s=1"]


def train_workers():
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    """One `varcon train` run in its own VARCON_HOME, shared by the tests that read its results: its home, what
    it printed, and its Ray Train worker actors."""
    home = tmp_path_factory.mktemp("e2e-home")
    printed = io.StringIO()
    before = {w.actor_id for w in train_workers()}
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("VARCON_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["train", *OVERRIDES]) == 0
    return home, printed.getvalue(), [w for w in train_workers() if w.actor_id not in before]


def the_run(home):
    client = MlflowClient(f"sqlite:///{home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    return client, run


@pytest.mark.cluster
def test_the_two_workers_ran_on_different_nodes_and_made_progress(trained):
    home, _, workers = trained
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert len(workers) == 2 and len({w.node_id for w in workers}) == 2
    assert list((home / ".cache" / "ray_results").glob("e2e-*/checkpoint_*/state.pt")), "rank 0 wrote to storage"
    client, run = the_run(home)
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 2 and losses[1] < losses[0], "training across nodes makes progress"


@pytest.mark.cluster
def test_train_command_records_a_complete_mlflow_run(trained):
    home, summary, _ = trained
    assert "val_knn_top1_k20: " in summary and "test_knn_top1_k20: " in summary
    assert "by val_knn_top1_k20, the validation split" in summary and "mlflow ui --backend-store-uri" in summary
    epochs = [line for line in summary.splitlines() if line.startswith("epoch ")]  # from Ray's report stream
    assert [line.split()[1] for line in epochs] == ["0/2", "1/2", "2/2"]
    assert "val_knn_top1_k20" in epochs[2] and "loss " in epochs[2] and "tau2 " in epochs[2] and "ETA " in epochs[2]

    (beton,) = (home / ".cache" / "data").glob("digits-*/train.beton")
    assert beton.is_file() and read_manifest(beton)["num_samples"] == 1347

    client, run = the_run(home)
    assert run.info.status == "FINISHED" and run.info.run_id in summary
    assert run.data.params == flatten(load_config(None, OVERRIDES))

    history = client.get_metric_history(run.info.run_id, "val_knn_top1_k20")
    assert sorted(m.step for m in history) == [0, 1, 2]  # random init, then each epoch
    per_epoch = ("train_loss", "train_kl", "train_nll", "train_tau2_mean", "train_confidence_mean", "tau1", "eps",
                 "lr", "epoch_time_s", "images_per_s", "val_knn_top1_k200", "eval_time_s")
    for key in per_epoch:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] in ([1, 2], [0, 1, 2]), key
    for key in ("test_knn_top1_k20", "test_probe_top1", "test_probe_top5", "val_probe_top1", "test_fewshot_5way_1shot",
                "test_fewshot_5way_5shot", "test_dispersion_intra_cos"):  # the test split: at the end only
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2], key

    def listing(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"config.yaml", "dataset", "environment", "plots", "checkpoints"} <= listing()
    assert listing("plots") == {f"plots/{name}.png" for name in (
        "embedding_pca", "embedding_tsne", "knn_confusion_matrix", "learning_curves", "temperature_schedule")}
    assert listing("checkpoints/final") == {"checkpoints/final/state.pt"}
    assert listing("checkpoints/best") == {"checkpoints/best/state.pt"}
    logged = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(home))))
    assert logged["optim"]["epochs"] == 2 and logged["ray"]["num_workers"] == 2

    # one monitor per machine: Ray Train ranks nodes by IP, and the session's two Ray nodes share this machine's
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {key.split("/")[1] for key in system} == {f"node0-{socket.gethostname()}"}, sorted(system)
    measured = {key.split("/", 2)[2] for key in system}
    assert {"cpu_utilization_percentage", "system_memory_usage_megabytes"} <= measured
    if torch.cuda.is_available():
        assert "gpu_0_utilization_percentage" in measured

    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.data.tags["varcon.git_commit"] == run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True,
                                text=True).stdout.strip())
    assert run.data.tags["varcon.git_dirty"] == str(dirty).lower()
    assert ("code" in listing()) == dirty  # the uncommitted diff only when there is one

    (version,) = client.search_model_versions("name='e2e-encoder'")
    assert version.run_id == run.info.run_id
    with using_tracking_uri(client.tracking_uri):
        encoder = mlflow.pytorch.load_model(f"models:/e2e-encoder/{version.version}")
    assert encoder(torch.zeros(3, 3, 32, 32)).shape[0] == 3


def test_bad_override_exits_2_before_any_work(varcon_home, capsys):
    assert main(["train", "loss.eps=0.5"]) == 2
    assert "loss.eps=0.5 must be smaller than loss.tau1" in capsys.readouterr().err
    assert not (varcon_home / ".cache").exists()


@pytest.mark.cluster
def test_rerunning_after_a_failure_resumes_into_the_same_mlflow_run(varcon_home, ray_session, inject_faults):
    args = ["train", "optim.epochs=3", "optim.warmup_epochs=0", "ray.max_failures=0", "name=resume",
            "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]
    inject_faults(fail_after_epoch=2)
    with pytest.raises(Exception, match="injected failure"):
        main(args)
    inject_faults()  # the fault is gone; the re-run raises ray.max_failures, which does not change the run
    assert main([*args, "ray.max_failures=5"]) == 0

    client = MlflowClient(f"sqlite:///{varcon_home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    assert run.info.status == "FINISHED" and "varcon.error" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_knn_top1_k20")) == [0, 1, 2, 3]
    assert "test_probe_top1" in run.data.metrics
    attempt = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "attempts/2.yaml", str(varcon_home))))
    assert attempt["changed"] == {"ray.max_failures": {"recorded": "0", "now": "5"}}


@pytest.mark.cluster
def test_eval_command_reproduces_the_final_metrics_of_a_checkpoint(trained, monkeypatch, capsys):
    home, _, _ = trained
    monkeypatch.setenv("VARCON_HOME", str(home))
    states = sorted((home / ".cache" / "ray_results").glob("e2e-*/checkpoint_*/state.pt"))
    folder = states[-1].parent  # checkpoint folders are named by time: the last is the final epoch
    assert main(["eval", "--checkpoint", str(folder), "eval.few_shot_episodes=20"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines() if ": " in line)
    _, run = the_run(home)
    assert printed["epoch"] == "2"
    # Same encoder (the workers evaluated rank 0's BatchNorm statistics, which it checkpointed) and data, but
    # another process, batch composition and thread count: features agree to float rounding, which moves no kNN
    # vote on these splits (none flips under a relative perturbation of 1e-5), so the kNN accuracies are the same
    # count of images (1e-4: the printed 4 decimals; one image of 450 is 2.2e-3); the probes train on another
    # process's float sums.
    tolerance = {"test_dispersion_intra_cos": 1e-3, "test_knn_top1_k20": 1e-4, "val_knn_top1_k20": 1e-4,
                 "test_probe_top1": 0.02, "test_fewshot_5way_5shot": 0.02}
    for key, abs_tol in tolerance.items():
        assert float(printed[key]) == pytest.approx(run.data.metrics[key], abs=abs_tol), key

    # the registered encoder's run logged the same final checkpoint: evaluating the model URI gives the same figures
    assert main(["eval", "--checkpoint", "models:/e2e-encoder/1", "eval.few_shot_episodes=20"]) == 0
    registered = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines() if ": " in line)
    assert registered["epoch"] == "2"
    for key in ("test_knn_top1_k20", "val_knn_top1_k20", "test_dispersion_intra_cos"):
        assert float(registered[key]) == pytest.approx(float(printed[key]), abs=1e-6), key


@pytest.mark.cluster
def test_operational_changes_continue_the_finished_run_without_training_again(trained, monkeypatch, capsys):
    """Another max_failures, resource wait, outage wait, loader thread count or evaluation setting is the same run:
    nothing is trained, the store keeps one run, and the attempt records what changed."""
    home, _, _ = trained
    monkeypatch.setenv("VARCON_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    changed = ["ray.max_failures=5", "ray.resource_wait_s=1", "tracking.outage_wait_s=7", "data.loader_threads=2",
               "eval.linear_probe_epochs=7"]
    folders = sorted(p.name for p in (home / ".cache" / "ray_results").glob("e2e-*/checkpoint_*"))
    assert main(["train", *OVERRIDES, *changed]) == 0
    printed = capsys.readouterr().out
    assert "has trained all 2 epochs already" in printed and "varcon eval --checkpoint" in printed
    assert sorted(p.name for p in (home / ".cache" / "ray_results").glob("e2e-*/checkpoint_*")) == folders
    client, run = the_run(home)  # still exactly one run
    assert run.info.status == "FINISHED" and int(run.data.tags["varcon.attempts"]) >= 2
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_knn_top1_k20")) == [0, 1, 2]
    (version,) = client.search_model_versions("name='e2e-encoder'")  # no second model version


@pytest.mark.cluster
@pytest.mark.parametrize("change, fragment", [
    ("ray.storage_path=elsewhere", "no checkpoint of it is in"),
    ("tracking.tracking_uri=sqlite:///{home}/other.db", "which the store sqlite:///"),
    ("loss.tau1=0.2", "names a run trained with other settings (loss.tau1: 0.1 -> 0.2)"),
])
def test_a_run_whose_store_and_checkpoints_disagree_is_refused(trained, monkeypatch, capsys, change, fragment):
    """Never a restart into a run that would log steps twice: a moved storage path, another store, or a run key
    given by hand for other settings each end with one line naming the fix, before anything is trained."""
    home, _, _ = trained
    monkeypatch.setenv("VARCON_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline.identity import run_key

    key = run_key(load_config(None, OVERRIDES))
    extra = [f"ray.run_name={key}"] if change.startswith("loss.") else []
    assert main(["train", *OVERRIDES, *extra, change.format(home=home)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varcon: error:") and fragment in err and len(err.splitlines()) == 1, err
    assert "fresh run" in err and not (home / "elsewhere").exists() and not (home / "other.db").exists()
