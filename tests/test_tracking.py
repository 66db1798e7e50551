"""MLflow tracking against a real SQLite store: runs, nesting, buffered metrics, models, the environment."""
import json
import os
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import plots
from pipeline.config import flatten, load_config
from pipeline.metric_forwarding import MetricSender
from pipeline.record import RunRecord
from pipeline.tracking import (
    child_runs,
    create_run,
    find_or_create_run,
    find_run,
    installed_requirements,
    resolve_tracking_uri,
    system_description,
    using_tracking_uri,
)


@pytest.fixture
def store(varcon_home):
    return resolve_tracking_uri()


def test_runs_are_found_again_by_their_key_and_nest_under_a_parent(store):
    config = load_config(None, ["name=child"])
    parent, resumed = find_or_create_run(store, "varcon", "sweep-1", "sweep-1", {"searcher": "random"})
    assert not resumed and find_run(store, "varcon", "trial-a") is None
    child = create_run(store, "varcon", "trial-a", config.name, flatten(config), {"varcon.trial_id": "a"},
                       parent_run_id=parent.run_id)
    found = find_run(store, "varcon", "trial-a")
    assert found.run_id == child.run_id and found.params == flatten(config) and found.metric_keys == []
    again, resumed_again = find_or_create_run(store, "varcon", "sweep-1", "sweep-1", {})
    assert resumed_again and again.run_id == parent.run_id
    (listed,) = child_runs(store, parent.run_id)
    assert listed.info.run_id == child.run_id and listed.data.tags["varcon.trial_id"] == "a"


def test_entries_sent_again_are_kept_once(store):
    """The exactly-once rule: an entry keeps the timestamp it was recorded with, so a restart or a finisher that
    sends a record again adds nothing, while a value recorded anew for the same step would be a second row."""
    run = create_run(store, "varcon", "k", "k", {})
    record = RunRecord(run.run_id, "k", "x")
    for epoch in range(3):
        record.add(epoch, {"train_loss": 1.0 / (epoch + 1), "tau1": 0.1})
    run.log_entries(record.own_entries(after_step=0))  # steps 1-2 arrived, then the sender's reply was lost
    run.log_entries(record.own_entries())  # the whole record again, from its checkpoint
    run.log_entries(record.own_entries())
    assert run.metric_history("train_loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [step for step, _ in run.metric_history("tau1")] == [0, 1, 2]
    retrained = RunRecord(run.run_id, "k", "x")
    retrained.add(2, {"train_loss": 0.25})  # what a replayed epoch would log: MLflow keeps it as a second value
    run.log_entries(retrained.entries)
    assert [step for step, _ in run.metric_history("train_loss")] == [0, 1, 2, 2]
    run.end()
    assert MlflowClient(store).get_run(run.run_id).info.status == "FINISHED"


def test_sender_retries_through_an_outage_without_losing_or_repeating_a_step():
    sent, calls, errors = [], [], []
    done = threading.Event()

    def flaky_send(batch):
        calls.append(len(batch))
        if len(calls) <= 3:
            raise ConnectionError("tracking server down")
        sent.extend((m.step, m.key, m.value) for m in batch)
        done.set()

    sender = MetricSender(flaky_send, retry_base_s=0.001, on_error=errors.append)
    sender.submit([[1, "a", 1.0, 10], [1, "b", 2.0, 10]])
    sender.submit([[2, "a", 3.0, 20]])
    assert sender.close(timeout_s=30) == []
    assert sorted(sent) == [(1, "a", 1.0), (1, "b", 2.0), (2, "a", 3.0)]
    assert len(errors) == sender.failures >= 3


def test_sender_hands_back_what_a_dead_store_never_took():
    sender = MetricSender(lambda batch: (_ for _ in ()).throw(ConnectionError("down")), retry_base_s=0.001,
                          on_error=lambda exc: None)
    sender.submit([[1, "a", 1.0, 10]])
    sender.submit([[2, "a", 2.0, 20], [2, "b", 0.5, 20]])
    assert sender.close(timeout_s=0.2) == [(1, {"a": 1.0}), (2, {"a": 2.0, "b": 0.5})]


def test_logged_encoder_loads_back_and_registers(store, tmp_path, monkeypatch):
    """The encoder is logged as an exported graph (MLflow's pt2, no pickle to run at load) that reproduces its
    features at another batch size than the one it was exported with. It belongs to its run's experiment (MLflow
    files a model by the process's active experiment first: the Default one, whose local artifact root is
    ./mlruns in the working directory), and nothing is written where the process happens to run."""
    from pipeline.config import load_config
    from pipeline.models import build_model

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = create_run(store, "varcon", "model-run", "model-run", {})
    encoder = build_model(load_config(None, []), 10).encoder.eval()
    example = torch.zeros(2, 3, 32, 32)
    model_uri = run.log_pytorch_model(encoder, "encoder", example)
    experiment_id = MlflowClient(store).get_run(run.run_id).info.experiment_id
    (model,) = MlflowClient(store).search_logged_models(experiment_ids=[experiment_id])
    assert model.source_run_id == run.run_id and model.model_uri == model_uri
    assert list(elsewhere.iterdir()) == []  # no ./mlruns
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    with using_tracking_uri(store):
        logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path)))
    assert sorted(path.name for path in (logged / "data").iterdir()) == ["model.pt2"]
    assert run.register_model("digits-encoder") == 1
    assert run.register_model("digits-encoder") == 2
    # MLflow's fluent API reads a process-wide URI (and exports it): logging leaves this process's as it was
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with using_tracking_uri(store):
        loaded = mlflow.pytorch.load_model(model_uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), encoder(images))
    versions = MlflowClient(store).search_model_versions("name='digits-encoder'")
    assert {v.run_id for v in versions} == {run.run_id}


def test_logged_environment_leaves_secrets_out(store, monkeypatch):
    monkeypatch.setenv("VARCON_API_TOKEN", "hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter3")
    monkeypatch.setenv("RAY_ADDRESS", "http://alice:hunter4@head:8265")
    description = system_description()
    text = json.dumps(description)
    assert "hunter" not in text and "VARCON_API_TOKEN" not in text
    assert description["environment"]["RAY_ADDRESS"] == "http://***@head:8265"
    assert "torch==" in installed_requirements() and "mlflow==" in installed_requirements()

    run = create_run(store, "varcon", "env-run", "env-run", {})
    run.log_environment()
    files = {a.path for a in run.client.list_artifacts(run.run_id, "environment")}
    assert files == {"environment/requirements.txt", "environment/system.json"}


def test_plots_are_png_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 16)) + labels[:, None] * 3.0
    history = {"train_loss": [(1, 2.0), (2, 1.5)], "val_knn_top1_k20": [(0, 0.3), (1, 0.6), (2, 0.7)],
               "tau1": [(1, 0.1), (2, 0.08)], "eps": [(1, 0.02), (2, 0.01)], "lr": [(1, 0.5), (2, 0.1)]}
    made = [plots.embedding_plot(features, labels, "pca", tmp_path / "pca.png"),
            plots.embedding_plot(features, labels, "tsne", tmp_path / "tsne.png"),
            plots.confusion_matrix_plot(labels, labels[::-1], 3, tmp_path / "cm.png", "cm"),
            plots.learning_curves_plot(history, tmp_path / "curves.png"),
            plots.temperature_plot(history, tmp_path / "tau.png")]
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    separated = plots.embed_2d(features.astype(np.float32), "pca")
    centres = [separated[labels == c].mean(0) for c in range(3)]
    assert np.linalg.norm(centres[0] - centres[2]) > 3 * separated[labels == 0].std()
