"""The cluster's tracking server behind MLflow's basic-auth app (its users on PostgreSQL, as ``cluster.yaml`` starts
it, every user but the admin without permissions by default): a training without credentials, with a wrong
password, or by a user not granted its experiment, is one line and exit 2 before anything is written;
with the credentials in the node-local ``~/.mlflow/credentials`` (never in a Ray runtime_env, which the dashboard
shows), every process that logs (the driver, Ray Train's controller) reaches the server and the run holds its
metrics."""
import os

import pytest
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient
from services import TrackingService
from varcon_process import succeeded, varcon

TRAIN = ["train", "name=authed", "optim.epochs=2", "optim.warmup_epochs=0", "eval.linear_probe_epochs=3",
         "eval.few_shot_episodes=5"]


def files_under(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names}


def credentials(home, username, password):
    (home / ".mlflow").mkdir(exist_ok=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {username}\nmlflow_tracking_password = {password}\n")


@pytest.mark.cluster
def test_a_server_behind_basic_auth_takes_a_run_only_with_the_credentials_of_the_node_file(
        varcon_home, tmp_path_factory, s3, tracking_service, monkeypatch):
    _, database = tracking_service
    bucket = s3.create_bucket("varcon-authed")
    service = TrackingService(database.create_database("mlflow_authed"), f"s3://{bucket}/artifacts", s3,
                              auth_database_uri=database.create_database("mlflow_users")).start()
    home = tmp_path_factory.mktemp("user-home")  # the node's home: where MLflow's client reads credentials
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    env = {**s3.env, "VARCON_HOME": str(varcon_home), "HOME": str(home)}
    train = [*TRAIN, f"tracking.tracking_uri={service.url}"]
    try:
        before = files_under(varcon_home)
        for password, refused in ((None, "refused no credentials (HTTP 401)"),
                                  ("wrong", "refused the credentials of user 'admin' (HTTP 401)")):
            if password:
                credentials(home, TrackingService.ADMIN, password)
            done = varcon(*train, env=env)
            assert done.returncode == 2, done.stderr[-3000:]
            (line,) = done.stderr.strip().splitlines()
            assert refused in line and "~/.mlflow/credentials" in line, line
            assert files_under(varcon_home) == before  # nothing prepared, stored or started

        credentials(home, TrackingService.ADMIN, service.admin_password)
        succeeded(varcon(*train, env=env))
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", TrackingService.ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", service.admin_password)
        client = MlflowClient(service.url)
        (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        AuthServiceClient(service.url).create_user("reader", "reader-password")  # no grant on experiment varcon
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the file's user only
            monkeypatch.delenv(name)
        with pytest.raises(Exception, match="401"):  # the server really requires credentials
            MlflowClient(service.url).search_experiments()
        credentials(home, "reader", "reader-password")
        before = files_under(varcon_home)
        done = varcon(*train, "name=not-granted", env=env)
        assert done.returncode == 2, done.stderr[-3000:]
        (line,) = done.stderr.strip().splitlines()
        assert "refused the credentials of user 'reader' (HTTP 403) for experiment 'varcon'" in line, line
        assert files_under(varcon_home) == before
    finally:
        service.stop()
