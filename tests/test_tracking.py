"""MLflow tracking against a real SQLite store: runs, nesting, buffered metrics, models, the environment."""
import json
import threading

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import plots
from pipeline.config import flatten, load_config
from pipeline.tracking import (UNLOGGED_FILE, MetricSender, TrackedRun, child_runs, installed_requirements,
                               resolve_tracking_uri, save_unsent, system_description)


@pytest.fixture
def store(varcon_home):
    return resolve_tracking_uri()


def test_find_or_start_reopens_the_run_of_the_same_key_and_nests_children(store):
    config = load_config(None, ["name=child"])
    parent, resumed = TrackedRun.find_or_create(store, "varcon", "sweep-1", "sweep-1", {"searcher": "random"})
    assert not resumed
    child, resumed = TrackedRun.find_or_start(config, store, "trial-a", parent_run_id=parent.run_id,
                                              tags={"varcon.trial_id": "a"})
    again, resumed_again = TrackedRun.find_or_start(config, store, "trial-a", parent_run_id=parent.run_id)
    assert not resumed and resumed_again and again.run_id == child.run_id
    (listed,) = child_runs(store, parent.run_id)
    assert listed.info.run_id == child.run_id and listed.data.tags["varcon.trial_id"] == "a"
    assert listed.data.params == flatten(config)


def test_metrics_logged_in_the_background_arrive_once_per_step(store):
    run, _ = TrackedRun.find_or_create(store, "varcon", "k", "k", {})
    for epoch in range(1, 6):
        run.log_metrics({"train_loss": 1.0 / epoch, "tau1": 0.1}, step=epoch)
    assert run.flush(timeout_s=30) == []
    assert run.metric_history("train_loss") == [(e, pytest.approx(1.0 / e)) for e in range(1, 6)]
    run.end()
    assert MlflowClient(store).get_run(run.run_id).info.status == "FINISHED"


def test_saved_metrics_are_sent_later_without_repeating_a_step_the_run_holds(store, tmp_path):
    run, _ = TrackedRun.find_or_create(store, "varcon", "k", "k", {})
    run.log_metrics({"train_loss": 1.0}, step=1)  # this one reached the store, but its reply was lost
    run.flush(timeout_s=30)
    save_unsent([(1, {"train_loss": 1.0})], tmp_path)
    save_unsent([(2, {"train_loss": 0.5, "knn_top1_k20": 0.9}), (3, {"train_loss": 0.25})], tmp_path)  # merged
    assert run.log_saved_metrics(tmp_path) == 3
    assert run.metric_history("train_loss") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert run.metric_history("knn_top1_k20") == [(2, pytest.approx(0.9))]
    assert not (tmp_path / UNLOGGED_FILE).exists() and run.log_saved_metrics(tmp_path) == 0


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
    sender.submit({"a": 1.0, "b": 2.0}, step=1)
    sender.submit({"a": 3.0}, step=2)
    assert sender.close(timeout_s=30) == []
    assert sorted(sent) == [(1, "a", 1.0), (1, "b", 2.0), (2, "a", 3.0)]
    assert len(errors) == sender.failures >= 3


def test_sender_hands_back_what_a_dead_store_never_took():
    sender = MetricSender(lambda batch: (_ for _ in ()).throw(ConnectionError("down")), retry_base_s=0.001,
                          on_error=lambda exc: None)
    sender.submit({"a": 1.0}, step=1)
    sender.submit({"a": 2.0, "b": 0.5}, step=2)
    assert sender.close(timeout_s=0.2) == [(1, {"a": 1.0}), (2, {"a": 2.0, "b": 0.5})]


def test_logged_encoder_loads_back_and_registers(store):
    run, _ = TrackedRun.find_or_create(store, "varcon", "model-run", "model-run", {})
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    example = torch.randn(2, 3, 8, 8)
    model_uri = run.log_pytorch_model(encoder, "encoder", example)
    assert run.register_model("digits-encoder") == 1
    assert run.register_model("digits-encoder") == 2
    mlflow.set_tracking_uri(store)
    loaded = mlflow.pytorch.load_model(model_uri)
    torch.testing.assert_close(loaded(example), encoder(example))
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

    run, _ = TrackedRun.find_or_create(store, "varcon", "env-run", "env-run", {})
    run.log_environment()
    files = {a.path for a in run.client.list_artifacts(run.run_id, "environment")}
    assert files == {"environment/requirements.txt", "environment/system.json"}


def test_plots_are_png_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 16)) + labels[:, None] * 3.0
    history = {"train_loss": [(1, 2.0), (2, 1.5)], "knn_top1_k20": [(0, 0.3), (1, 0.6), (2, 0.7)],
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
