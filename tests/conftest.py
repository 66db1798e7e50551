"""Shared fixtures: one Ray instance per test session, isolated working directories, the prepared digits data,
MLflow servers on loopback, injected faults.

Tests that use the Ray cluster or a tracking server are marked ``cluster`` here; ``make test-fast`` runs the
others (``-m "not cluster"``).
"""
from __future__ import annotations

import json
import os
import tempfile
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray destroys an actor whose last handle is gone gracefully, waiting up to 30 s before it kills it; trainings and
# trials of one session follow each other closely, and a Tune sweep started while such destroys were pending here
# once never heard that its first trial's actor was alive (the driver's actor notifications were lost). Tests
# keep the wait short and start sweeps on a settled cluster (``settled_cluster``).
os.environ.setdefault("RAY_actor_graceful_shutdown_timeout_ms", "3000")
# where tests write the faults they inject (pipeline.faults); every Ray process of the session gets the variable
FAULTS_FILE = os.path.join(tempfile.mkdtemp(prefix="varcon-faults-"), "faults.json")
os.environ["VARCON_FAULTS_FILE"] = FAULTS_FILE
CLUSTER_FIXTURES = {"ray_session", "settled_cluster", "mlflow_server", "trained"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture
def inject_faults():
    """``inject_faults(**faults)`` writes the faults file (see ``pipeline.faults``); it is removed after the test."""
    def write(**faults) -> None:
        with open(FAULTS_FILE, "w") as handle:
            json.dump(faults, handle)

    yield write
    for path in (FAULTS_FILE, FAULTS_FILE + ".lock"):
        if os.path.exists(path):
            os.remove(path)


@pytest.fixture
def varcon_home(tmp_path, monkeypatch):
    """An empty VARCON_HOME so caches, stores and Ray results land in the test's own folder."""
    monkeypatch.setenv("VARCON_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory):
    """The default digits splits written once per session."""
    from pipeline.config import load_config
    from pipeline.data import prepare_dataset

    return prepare_dataset(load_config().data, tmp_path_factory.mktemp("data"), log=lambda *_: None)


@pytest.fixture(scope="module")
def ray_session():
    """The Ray instance of a test module, shared by its tests: a 2-node cluster on this machine (a head and a
    worker node, 1 CPU each), so multi-node placement is real. One per module keeps each module's driver state
    fresh: in a session-wide cluster a sweep late in the suite twice never heard that its first trial's actor was
    alive (the GCS created it; the driver's actor notifications stopped), though the same test passes alone.
    """
    import ray
    from ray.cluster_utils import Cluster

    with socket.socket() as sock:  # the last module's dashboard may hold its port a little longer
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                           "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=1)
    # MLflow's HTTP client retries a refused connection for minutes by default; the product's own sender
    # retries on top of it, so tests of a server outage let Ray workers fail each call at once
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "VARCON_FAULTS_FILE": FAULTS_FILE}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def settled_cluster(ray_session):
    """The session's cluster once no Ray Train controller or worker of an earlier test is still being torn down
    (bounded: 60 s)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [a for a in list_actors(filters=[("state", "!=", "DEAD")], limit=10000)
                if a.class_name in ("TrainController", "RayTrainWorker", "ImplicitFunc")]
        if not busy:
            break
        time.sleep(1)
    return ray_session


class MlflowServer:
    """``varcon ui``'s command (``pipeline.tracking.ui_command``) serving ``store`` on a free loopback port, in
    its own process group (``process.pid``), so that it can be killed whole, also from another process."""

    def __init__(self, store: str) -> None:
        from pipeline.tracking import ui_command

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.command = ui_command(store, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True,
                                        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while True:  # the server takes a few seconds to start: poll its health endpoint
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`{' '.join(self.command)}` did not start") from None
                time.sleep(0.25)

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # killed already (an outage test)
                pass
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def mlflow_server():
    """``mlflow_server(store)`` starts an ``MlflowServer``; all are stopped after the test."""
    servers = []

    def start(store: str) -> MlflowServer:
        servers.append(MlflowServer(store).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
