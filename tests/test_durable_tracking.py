"""The tracking service of ``cluster.yaml`` on loopback: ``mlflow server`` on PostgreSQL with its artifacts in an
S3 bucket, and the sweep's Ray storage and outputs in another bucket. Concurrent trials log every epoch exactly once;
then the S3 server, PostgreSQL and MLflow are restarted on the same data, and everything is still there."""
import pytest
from mlflow.tracking import MlflowClient
from varcon_process import succeeded, varcon

SWEEP = ["--config", "configs/tune/digits_asha.yaml", "tune.name=t-durable", "tune.searcher=random",
         "tune.scheduler=fifo", "tune.num_samples=2", "tune.max_concurrent_trials=2", "optim.epochs=2",
         "optim.warmup_epochs=0", "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10",
         "tune.registered_model_name=t-durable-encoder"]


def snapshot(client: MlflowClient) -> dict:
    """Every run of the experiment with its status, parent, params and full metric histories, and the
    registered versions: what must survive a restart."""
    experiment = client.get_experiment_by_name("varcon")
    runs = {}
    for run in client.search_runs([experiment.experiment_id]):
        histories = {key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id,
                                                                                                 key))
                     for key in run.data.metrics}
        runs[run.info.run_id] = (run.info.status, run.data.tags.get("mlflow.parentRunId"), run.data.params,
                                 histories)
    versions = sorted((v.name, v.version, v.run_id) for v in client.search_model_versions("name='t-durable-encoder'"))
    return {"runs": runs, "versions": versions}


@pytest.mark.cluster
def test_a_sweep_on_postgresql_and_s3_logs_each_epoch_once_and_survives_restarting_all_three(
        varcon_home, s3, tracking_service):
    service, database = tracking_service
    bucket = s3.create_bucket("varcon-sweeps")
    succeeded(varcon("tune", *SWEEP, f"tracking.tracking_uri={service.url}", f"ray.storage_path=s3://{bucket}/ray",
                     f"tune.output_dir=s3://{bucket}/sweeps", env={**s3.env, "VARCON_HOME": str(varcon_home)}))
    client = MlflowClient(service.url)
    before = snapshot(client)
    (parent_id,) = [run_id for run_id, (_, parent, _, _) in before["runs"].items() if parent is None]
    children = {run_id: run for run_id, run in before["runs"].items() if run[1] == parent_id}
    assert before["runs"][parent_id][0] == "FINISHED" and len(children) == 2
    for status, _, _, histories in children.values():
        assert status == "FINISHED"
        assert [step for step, _, _ in histories["train_loss"]] == [1, 2]  # each epoch once, from concurrent trials
        for key, history in histories.items():
            steps = [step for step, _, _ in history]
            assert len(steps) == len(set(steps)), key  # no step logged twice
    ((_, _, best_run),) = before["versions"]
    assert best_run in children

    artifacts = s3.keys("varcon-mlflow", "artifacts/")  # proxied by the server into its bucket
    assert any(key.endswith("/encoder/MLmodel") or key.endswith("/MLmodel") for key in artifacts), artifacts[:20]
    assert any(key.endswith("/best_config.yaml") for key in artifacts)
    outputs = s3.keys(bucket)
    assert {"sweeps/t-durable/best_config.yaml", "sweeps/t-durable/trials.csv"} <= set(outputs)
    assert any(key.startswith("ray/t-durable/") for key in outputs)  # Tune's experiment state
    assert not (varcon_home / ".cache" / "ray_results").exists() and not (varcon_home / ".cache" / "sweeps").exists()

    service.stop()
    database.stop()
    s3.restart()
    database.start()
    service.start()
    client = MlflowClient(service.url)
    assert snapshot(client) == before
    table = client.download_artifacts(parent_id, "trials.csv", str(varcon_home))  # artifacts back through the server
    text = open(table).read()
    assert all(run_id in text for run_id in children)  # trials.csv names every trial's run
