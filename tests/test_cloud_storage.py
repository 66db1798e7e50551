"""Runs whose storage is a bucket (``s3://`` on the session's S3-compatible server), as on a cluster: checkpoints,
run records and sweep outputs go through ``pyarrow.fs``; nothing of them lands on the local disk."""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from varcon_process import succeeded, varcon

from pipeline import storage
from pipeline.cli import main
from pipeline.config import ConfigError

SHORT = ["optim.epochs=3", "optim.warmup_epochs=0", "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.cluster
def test_a_two_worker_training_in_a_bucket_survives_a_failure_and_eval_reads_it_back(
        varcon_home, s3, inject_faults, monkeypatch, capsys):
    bucket = s3.create_bucket("varcon-train-runs")
    inject_faults(fail_after_epoch=1)  # rank 0 raises once after epoch 1's checkpoint: Ray restores from S3
    args = ["train", *SHORT, "ray.max_failures=1", "name=in-bucket", f"ray.storage_path=s3://{bucket}/runs",
            "ray.checkpoint_upload=async"]  # uploads in the background, forwarded once persisted
    env = {**s3.env, "VARCON_HOME": str(varcon_home)}
    done = varcon(*args, env=env)
    printed = succeeded(done)
    assert "TrainingReport(" not in done.stdout + done.stderr  # Ray's chatter is in its log folder, not here
    (logs_line,) = [line for line in printed.splitlines() if line.startswith("Ray's own output")]
    logs = Path(logs_line.split(": ", 1)[1].split("  (")[0])
    ray_lines = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.is_file())
    assert "injected failure after epoch 1" in ray_lines and "TrainingReport(" in ray_lines  # failed, recovered
    epochs = [line.split()[1] for line in printed.splitlines() if line.startswith("epoch ")]
    assert sorted(set(epochs)) == ["0/3", "1/3", "2/3", "3/3"]  # one line per epoch (a replay is marked again)
    client = MlflowClient(f"sqlite:///{varcon_home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train_loss") == [1, 2, 3]  # epochs 2-3 after the restore, once each
    assert steps(client, run.info.run_id, "val_knn_top1_k20") == [0, 1, 2, 3]
    key = run.data.tags["varcon.run_key"]
    assert run.data.tags["varcon.run_folder"] == f"s3://{bucket}/runs/{key}"
    kept = s3.keys(bucket, f"runs/{key}/")
    assert f"runs/{key}/checkpoint_manager_snapshot.json" in kept
    states = [k for k in kept if k.endswith("/state.pt")]
    assert len(states) >= 2 and all(k.replace("state.pt", "record.json") in kept for k in states)
    assert not (varcon_home / ".cache" / "ray_results").exists()  # nothing of the run on the local disk
    (final_line,) = [line for line in printed.splitlines() if line.startswith("final checkpoint: ")]
    folder = final_line.split("varcon eval --checkpoint ")[1].rstrip(")")
    assert folder.startswith(f"s3://{bucket}/runs/{key}/checkpoint_")
    inject_faults()
    again = succeeded(varcon(*args, env=env))  # the same command finds the run's checkpoints in the bucket
    assert f"run {key} has trained all 3 epochs already: nothing to train" in again

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VARCON_HOME", str(varcon_home))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", folder, "eval.few_shot_episodes=10"]) == 0
    metrics = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines() if ": " in line)
    assert metrics["epoch"] == "3"
    assert float(metrics["test_knn_top1_k20"]) == pytest.approx(run.data.metrics["test_knn_top1_k20"], abs=0.01)


@pytest.mark.cluster
@pytest.mark.parametrize("uri, fragment", [
    ("s3://varcon-no-such-bucket/runs", "bucket varcon-no-such-bucket does not exist"),
    ("nosuchscheme://bucket/runs", "cannot be opened"),
])
def test_storage_that_cannot_be_used_is_refused_before_ray_starts(varcon_home, s3, monkeypatch, capsys, uri,
                                                                  fragment):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", f"ray.storage_path={uri}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("varcon: error: ") and fragment in line
    assert not (varcon_home / ".cache").exists()  # nothing prepared, no store created


@pytest.mark.cluster
def test_an_unreachable_storage_service_names_the_fix(s3, monkeypatch):
    bucket = s3.create_bucket("varcon-locked")
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConfigError, match="is not writable .* give every node credentials"):
        storage.check_writable(storage.location(f"s3://{bucket}/runs"), "ray.storage_path")


def test_a_local_storage_path_is_checked_without_creating_it(tmp_path):
    place = storage.location(str(tmp_path / "runs" / "deeper"))
    storage.check_writable(place, "ray.storage_path")
    assert not (tmp_path / "runs").exists()  # Ray creates it when it writes; a refused run leaves nothing
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="a-file is not a writable folder"):
        storage.check_writable(storage.location(str(tmp_path / "a-file" / "runs")), "ray.storage_path")
