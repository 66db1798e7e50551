"""Shared fixtures: one Ray instance per test session, isolated working directories, the prepared digits data,
MLflow servers on loopback, injected faults.

Tests that use the Ray cluster or a tracking server are marked ``cluster`` here; ``make test-fast`` runs the
others (``-m "not cluster"``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
# where tests write the faults they inject (pipeline.faults); every Ray process of the session gets the variable
FAULTS_FILE = os.path.join(tempfile.mkdtemp(prefix="varcon-faults-"), "faults.json")
os.environ["VARCON_FAULTS_FILE"] = FAULTS_FILE
CLUSTER_FIXTURES = {"ray_session", "mlflow_server", "trained", "s3", "tracking_service"}


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


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session, shared by every test that needs one: a 2-node cluster on
    this machine (a head and a worker node, 1 CPU each), so multi-node placement is real.
    """
    import ray
    from ray.cluster_utils import Cluster

    with socket.socket() as sock:  # not Ray's default port, which a test's own local Ray instance may take
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


@pytest.fixture(scope="session")
def s3():
    """The session's S3-compatible server (``tests.services.S3Server``)."""
    from services import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tracking_service(s3):
    """``mlflow server`` on a throw-away PostgreSQL with its artifacts in the S3 server's ``varcon-mlflow``
    bucket: the durable tracking service of ``cluster.yaml``, on loopback. Yields (service, database)."""
    from services import PostgresServer, TrackingService

    database = PostgresServer().start()
    bucket = s3.create_bucket("varcon-mlflow")
    service = TrackingService(database.create_database("mlflow"), f"s3://{bucket}/artifacts", s3).start()
    yield service, database
    service.stop()
    database.remove()
