"""MLflow tracking: runs, their parameters, metrics, artifacts, tags and the model registry. The modules that
import MLflow are this one, ``pipeline.tracking_check``, ``pipeline.metric_forwarding`` and
``pipeline.system_metrics``
(``tests/test_boundaries.py`` holds them to it).

The default store is a SQLite file under ``<workdir>/.cache/mlflow`` (MLflow 3 refuses the old ``./mlruns`` file
store by default); ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point elsewhere (the cluster's server).

A training is one run, found again by its ``varcon.run_key`` tag on every attempt; a sweep is a parent run whose
trials are child runs (``mlflow.parentRunId``). Metric values arrive as entries ``[step, key, value,
timestamp_ms]`` whose timestamp was fixed when the value was first recorded (``pipeline.record.RunRecord``),
so sending an entry again is a no-op: MLflow's store keeps one row per (key, step, timestamp, value). A
background ``pipeline.metric_forwarding.MetricSender`` sends them without blocking its caller and retries through
an outage.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pipeline.config import first_line, workdir
from pipeline.names import MODEL_URI_TAG, PARENT_TAG, RUN_KEY_TAG

if TYPE_CHECKING:
    import torch
    from mlflow.tracking import MlflowClient

_T = TypeVar("_T")  # what a guarded call returns

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
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


def redacted(uri: str) -> str:
    """``uri`` with any ``user:password@`` replaced by ``***@``."""
    return URL_CREDENTIALS.sub("***@", uri)


def ui_command(tracking_uri: str, port: int = 5000) -> list[str]:
    """The command that serves the MLflow UI for ``tracking_uri`` on 127.0.0.1 (this environment's mlflow)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    executable = "mlflow"
    if mlflow.exists():
        relative = os.path.relpath(mlflow)
        executable = str(mlflow) if relative.startswith("..") else relative
    command = [executable, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    if tracking_uri.startswith("sqlite:///"):  # serve the artifacts that sit beside the database
        command += ["--default-artifact-root", (default_store_dir() / "artifacts").as_uri()]
    return command


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in ./mlruns
        artifact_location = (default_store_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


@dataclass
class FoundRun:
    """An existing run as the store holds it."""

    run_id: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metric_keys: list[str]


def _guarded(tracking_uri: str, call: Callable[[], _T]) -> _T:
    try:
        return call()
    except Exception as exc:  # MLflow raises several types for an unusable store
        raise TrackingError(f"cannot use the MLflow store {tracking_uri} ({exc}): check the URI or start the "
                            f"server, or unset MLFLOW_TRACKING_URI to use the local SQLite store") from None


def find_run(tracking_uri: str, experiment: str, run_key: str) -> FoundRun | None:
    """The run tagged ``varcon.run_key=run_key`` in ``experiment`` (one search), or ``None``. A local SQLite
    store that does not exist yet holds no run (and is not created by asking)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None
    client = _client(tracking_uri)

    def search():
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                  max_results=1)

    runs = _guarded(tracking_uri, search)
    if not runs:
        return None
    run = runs[0]
    return FoundRun(run.info.run_id, run.info.status, dict(run.data.params), dict(run.data.tags),
                    list(run.data.metrics))


def create_run(tracking_uri: str, experiment: str, run_key: str, display_name: str, params: dict[str, str],
               tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> TrackedRun:
    """A new run tagged ``varcon.run_key=run_key`` holding ``params`` (nested under ``parent_run_id``), shown as
    ``display_name`` in the UI."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    all_tags = {**(tags or {}), RUN_KEY_TAG: run_key}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id

    def create() -> str:
        run = client.create_run(_experiment_id(client, experiment, tracking_uri), run_name=display_name, tags=all_tags)
        batch = [Param(key, str(value)[:MAX_PARAM_VALUE_LENGTH]) for key, value in sorted(params.items())]
        for start in range(0, len(batch), MAX_PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=batch[start:start + MAX_PARAMS_PER_BATCH])
        return run.info.run_id

    return TrackedRun(tracking_uri, _guarded(tracking_uri, create))


def find_or_create_run(tracking_uri: str, experiment: str, run_key: str, display_name: str, params: dict[str, str],
                       tags: dict[str, str] | None = None) -> tuple[TrackedRun, bool]:
    """The run of ``run_key``, reopened, or a new one; returns ``(run, resumed)``. For runs without checkpoints
    (a sweep's parent run)."""
    found = find_run(tracking_uri, experiment, run_key)
    if found is None:
        return create_run(tracking_uri, experiment, run_key, display_name, params, tags), False
    run = TrackedRun(tracking_uri, found.run_id)
    run.reopen()
    return run, True


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``register_model``) reads a process-wide tracking URI, which
    ``mlflow.set_tracking_uri`` also exports as ``$MLFLOW_TRACKING_URI`` to child processes: set it for the
    call only, so that no later run in this process (a sweep driver, a test session) is sent to this store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again


@contextlib.contextmanager
def using_experiment(experiment_id: str) -> Iterator[None]:
    """MLflow files a logged model (``log_model``, MLflow 3's LoggedModel) under the process's active experiment
    before its source run's: without one the Default experiment, whose artifact root on a local store is
    ``./mlruns`` in whatever folder the process runs. Name the run's experiment for the call only (MLflow's own
    ``$MLFLOW_EXPERIMENT_ID``), restoring what was there."""
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before


def as_metrics(entries: list) -> list:
    """``[step, key, value, timestamp_ms]`` entries as MLflow ``Metric`` entities."""
    from mlflow.entities import Metric

    return [Metric(key, float(value), int(stamp), int(step)) for step, key, value, stamp in entries]


class TrackedRun:
    """One MLflow run, addressed by id; safe to re-create in another process (e.g. the rank-0 worker)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = _client(tracking_uri)

    # -- metrics ---------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Send one step's metrics now (a sweep's parent run; trainings send their records' entries)."""
        self.log_entries([[step, key, value, int(time.time() * 1000)] for key, value in sorted(metrics.items())])

    def log_entries(self, entries: list) -> None:
        """Send ``[step, key, value, timestamp_ms]`` entries now, in batches; entries the run already holds are
        kept once by the store."""
        metrics = as_metrics(entries)
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def log_batch(self, metrics: list) -> None:
        """Send MLflow ``Metric`` entities (``as_metrics``; at most ``MAX_METRICS_PER_BATCH``) now."""
        self.client.log_batch(self.run_id, metrics=metrics)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    # -- artifacts, tags, status -----------------------------------------------------------------------------
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_environment(self) -> None:
        """``environment/requirements.txt`` (the installed distributions, like ``pip freeze``) and
        ``environment/system.json`` (Python, platform, accelerator, the ``VARCON_*``/``RAY_*``/``MLFLOW_*``
        variables); names that look secret are left out and credentials in URLs are masked."""
        self.log_text(installed_requirements(), "environment/requirements.txt")
        self.log_text(json.dumps(system_description(), indent=2, sort_keys=True), "environment/system.json")

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def delete_tag(self, key: str) -> None:
        self.client.delete_tag(self.run_id, key)

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    # -- models ----------------------------------------------------------------------------------------------
    def log_pytorch_model(self, model: torch.nn.Module, name: str, example_input: torch.Tensor) -> str:
        """Log ``model`` (an ``nn.Module`` on CPU, in eval mode) as an MLflow PyTorch model in the ``pt2`` format
        (``torch.export``: a graph and its weights, no pickle, so loading it runs no code of the file), exported
        with ``example_input`` ``[N, 3, H, W]`` (N > 1: the batch stays dynamic) and the signature inferred from
        it; returns its model URI (also kept in the ``varcon.model_uri`` tag)."""
        import mlflow
        import mlflow.pytorch
        import torch
        import torchvision
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model.eval()(example_input)
        signature = infer_signature(example_input.numpy(), output.numpy())
        requirements = [f"torch=={torch.__version__.split('+')[0]}",
                        f"torchvision=={torchvision.__version__.split('+')[0]}"]
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        with using_tracking_uri(self.tracking_uri), using_experiment(experiment_id):
            info = mlflow.pytorch.log_model(model, name=name, run_id=self.run_id, signature=signature,
                                            input_example=example_input.numpy(), pip_requirements=requirements,
                                            serialization_format="pt2")
        self.set_tags({MODEL_URI_TAG: info.model_uri})
        return info.model_uri

    def register_model(self, name: str) -> int:
        """Register this run's logged encoder (``log_pytorch_model``) as a new version of ``name``."""
        import mlflow

        model_uri = self.tags().get(MODEL_URI_TAG)
        if not model_uri:
            raise TrackingError(f"run {self.run_id} has no logged model to register: it did not finish training")
        with using_tracking_uri(self.tracking_uri):
            version = mlflow.register_model(model_uri, name, tags={"varcon.run_id": self.run_id})
        return int(version.version)


def registered_checkpoint(model_uri: str, tracking_uri: str, folder: Path) -> Path:
    """Download the final checkpoint (``checkpoints/final/state.pt``) of the run behind a registered model
    ``models:/NAME/VERSION`` into ``folder``; returns the folder holding ``state.pt``."""
    parts = model_uri.removeprefix("models:/").split("/")
    if len(parts) != 2 or not parts[1].isdigit():
        raise TrackingError(f"{model_uri} is not models:/NAME/VERSION (a version number): see the Models page "
                            f"of the MLflow UI")
    missing = TrackingError(f"the MLflow store {redacted(tracking_uri)} holds no {model_uri}: see the Models page of "
                            f"its UI (`varcon ui`), or point tracking.tracking_uri at the store that registered it")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise missing  # asking would create the store
    client = _client(tracking_uri)
    try:
        version = client.get_model_version(parts[0], parts[1])
    except Exception as exc:  # noqa: BLE001
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            raise missing from None
        raise TrackingError(f"cannot use the MLflow store {redacted(tracking_uri)} ({first_line(exc)}): check the "
                            f"URI or start the server") from None
    try:
        client.download_artifacts(version.run_id, "checkpoints/final", str(folder))
    except Exception:  # noqa: BLE001 - MLflow raises by store type when the artifact is missing
        raise TrackingError(f"the run {version.run_id} of {model_uri} logged no checkpoints/final/state.pt (it was "
                            f"trained with tracking.log_checkpoints=false): evaluate its checkpoint folder "
                            f"instead") from None
    return folder / "final"


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id`` (MLflow ``Run`` entities)."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def installed_requirements() -> str:
    """``name==version`` of every installed distribution, sorted; credentials in URLs masked."""
    lines = sorted({f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions()
                    if dist.metadata["Name"]}, key=str.lower)
    return URL_CREDENTIALS.sub("***@", "\n".join(lines)) + "\n"


def system_description() -> dict:
    import torch

    variables = {name: URL_CREDENTIALS.sub("***@", value) for name, value in os.environ.items()
                 if name.startswith(("VARCON_", "RAY_", "MLFLOW_", "CUDA_", "OMP_")) and not SECRET_NAME.search(name)}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "environment": variables,
    }
