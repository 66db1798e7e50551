"""Shared fixtures: one Ray instance per test session, isolated working directories, the prepared digits data,
MLflow servers on loopback, injected faults.

Tests that start Ray or a server are marked ``cluster`` where they are written (checked at collection);
``make test-fast`` runs the others (``-m "not cluster"``). The servers themselves are in ``services.py``.
"""
from __future__ import annotations

import json
import os
import tempfile

import pytest
from services import MlflowServer, PostgresServer, RaySession, S3Server, TrackingService, patience

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller takes in reports and sees its workers finish every 2 s by default: a few seconds of every
# run of the tests' one-second epochs (measured: a 3-trial digits sweep 135.6 s -> 127.1 s at 0.5 s); a real
# epoch takes minutes, so the product keeps Ray's default
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test-fast: the cores shared between pytest-xdist's workers, not
    # each worker's torch (and the ranks and subprocesses it starts) spreading threads over all of them
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# where tests write the faults they inject (pipeline.faults); every Ray process of the session gets the variable
FAULTS_FILE = os.path.join(tempfile.mkdtemp(prefix="varcon-faults-"), "faults.json")
os.environ["VARCON_FAULTS_FILE"] = FAULTS_FILE
CLUSTER_FIXTURES = {"ray_session", "mlflow_server", "trained", "s3", "tracking_service"}


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray or a server carries the ``cluster`` mark itself (a module's ``pytestmark`` or the
    test's decorator); one that uses such a fixture without it stops the collection, so the mark cannot be
    forgotten and is never guessed. On a machine loaded on purpose (``services.patience``), pytest-timeout's limit
    per test is stretched like the tests' own hang detectors."""
    unmarked = [item.nodeid for item in items if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("cluster") is None]
    if unmarked:
        raise pytest.UsageError("tests that use the Ray cluster or a server need @pytest.mark.cluster: "
                                + ", ".join(unmarked))
    per_test_s = float(config.getoption("timeout") or config.getini("timeout") or 0)  # pytest-timeout's
    if per_test_s and patience(1) > 1:  # a loaded machine: that hang detector stretched like every other
        for item in items:
            item.add_marker(pytest.mark.timeout(patience(per_test_s)))


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
    """The one Ray instance of the test session, shared by every test that needs one (``services.RaySession``).
    MLflow's HTTP client retries a refused connection for minutes by default; the product's own sender retries on
    top of it, so tests of a server outage let Ray workers fail each call at once."""
    session = RaySession({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "VARCON_FAULTS_FILE": FAULTS_FILE}).start()
    yield session.cluster
    session.stop()


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
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tracking_service(s3):
    """``mlflow server`` on a throw-away PostgreSQL with its artifacts in the S3 server's ``varcon-mlflow``
    bucket: the durable tracking service of ``cluster.yaml``, on loopback. Yields (service, database)."""
    database = PostgresServer().start()
    bucket = s3.create_bucket("varcon-mlflow")
    service = TrackingService(database.create_database("mlflow"), f"s3://{bucket}/artifacts", s3).start()
    yield service, database
    service.stop()
    database.remove()
