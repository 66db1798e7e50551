"""Shared fixtures: one Ray instance per test session, isolated working directories, the prepared digits data."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


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
    from pipeline.data import prepare_datasets

    return prepare_datasets(load_config().data, tmp_path_factory.mktemp("data"), log=lambda *_: None)


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session, shared by every test that needs one: a 2-node cluster on
    this machine (a head and a worker node, 1 CPU each), so multi-node placement is real.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
