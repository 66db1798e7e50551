"""MLflow tracking: the only module that imports MLflow.

The default store is a SQLite file under ``<workdir>/.cache/mlflow`` (MLflow 3 refuses the old ``./mlruns`` file
store by default); ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point elsewhere (the cluster's server).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.config import ExperimentConfig, flatten, workdir

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
RUN_KEY_TAG = "varcon.run_key"  # identifies one training across restarts and re-submissions
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the fix."""


def default_store_dir() -> Path:
    return workdir() / ".cache" / "mlflow"


def resolve_tracking_uri(configured: str = "") -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer its health check
    (MLflow's own client would retry for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(f"the MLflow tracking server {tracking_uri} does not answer ({problem}): start it "
                        f"(`mlflow server` or `varcon ui`), or unset MLFLOW_TRACKING_URI to use the local store")


def ui_command(tracking_uri: str) -> list[str]:
    """The command that serves the MLflow UI for ``tracking_uri`` on 127.0.0.1 (this environment's mlflow)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    executable = "mlflow"
    if mlflow.exists():
        relative = os.path.relpath(mlflow)
        executable = str(mlflow) if relative.startswith("..") else relative
    return [executable, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", "5000",
            "--workers", "1"]


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in ./mlruns
        artifact_location = (default_store_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


class TrackedRun:
    """One MLflow run, addressed by id; safe to re-create in another process (e.g. the rank-0 worker)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = _client(tracking_uri)

    @classmethod
    def find_or_start(cls, config: ExperimentConfig, tracking_uri: str, run_key: str,
                      tags: dict[str, str] | None = None) -> tuple[TrackedRun, bool]:
        """The run tagged ``varcon.run_key=run_key`` in ``config.tracking.experiment``, reopened, or a new one
        holding the resolved, flattened config as params. Returns ``(run, resumed)``.
        """
        from mlflow.entities import Param

        client = _client(tracking_uri)
        try:
            experiment_id = _experiment_id(client, config.tracking.experiment, tracking_uri)
            found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       max_results=1)
        except Exception as exc:  # MLflow raises several types for an unusable store
            raise TrackingError(f"cannot use the MLflow store {tracking_uri} ({exc}): check the URI or start the "
                                f"server, or unset MLFLOW_TRACKING_URI to use the local SQLite store") from None
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return cls(tracking_uri, found[0].info.run_id), True
        run = client.create_run(experiment_id, run_name=config.name, tags={**(tags or {}), RUN_KEY_TAG: run_key})
        params = [Param(key, value[:6000]) for key, value in sorted(flatten(config).items())]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
        return cls(tracking_uri, run.info.run_id), False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in sorted(metrics.items())]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
