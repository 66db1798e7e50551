"""Every real server the tests use, started and stopped here on loopback, with one free-port helper (``free_port``):
the session's 2-node Ray cluster (``RaySession``), an autoscaling Ray head on Ray's fake multi-node provider
(``AutoscalingHead``), ``varcon ui``'s MLflow server (``MlflowServer``), an S3-compatible server (moto's server
mode), a throw-away PostgreSQL cluster (the Debian package's binaries; ``initdb`` refuses root, so as the
``postgres`` user via ``runuser``), and ``mlflow server`` on PostgreSQL with its artifacts in the S3 server,
proxied (clients need no bucket credentials); and gloo process groups for the DDP tests (``spawn_ranks``).

moto keeps its objects in memory. A bucket outlives any server that fronts it, so ``S3Server.restart`` keeps the
bucket's objects across the restart (it copies every object out before stopping and back in after starting):
what is restarted is the service, as with a real one.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def patience(seconds: float) -> float:
    """A hang detector's limit: ``seconds`` on an idle machine, times ``VARCON_TEST_PATIENCE`` (default 1) on a machine
    loaded on purpose (``scripts/test_under_contention.sh`` sets it). Every wait of the tests for something to start
    or finish takes its limit from here; no assertion does (how fast is measured in ``bench/``, never asserted)."""
    factor = float(os.environ.get("VARCON_TEST_PATIENCE", "1"))
    if factor < 1:
        raise ValueError(f"VARCON_TEST_PATIENCE={factor}: a factor of 1 or more stretches the tests' hang detectors")
    return seconds * factor


def free_port() -> int:
    """A loopback port nothing listens on now (the one way the tests pick a port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The rank processes fork from the standard library's fork server, which imported these once (at the first
# ``spawn_ranks``): a rank then starts in a fraction of a second instead of importing torch and the pipeline anew.
# Forked from that server, ranks see the environment of the moment it started, not a test's later changes.
RANK_PRELOAD = ["torch", "torch.distributed", "pipeline.engine", "pipeline.evaluation"]


def process_context():
    """The multiprocessing context of every test that needs processes of its own: the fork server's."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # read when the server starts (the first process)
    return multiprocessing.get_context("forkserver")


def spawn_ranks(target, *args, world: int = 2) -> dict:
    """``target(rank, rendezvous, *args, results)`` in ``world`` new processes
    (``torch.multiprocessing.start_processes`` from the fork server), which join one gloo group through the
    rendezvous file (``join_group``; a file, not a port, so that no other process can take it meanwhile); returns
    what they put in ``results``."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="varcon-ranks-") as folder, process_context().Manager() as manager:
        results = manager.dict()
        mp.start_processes(target, args=(os.path.join(folder, "rendezvous"), *args, results), nprocs=world,
                           join=True, start_method=process_context().get_start_method())
        return dict(results)


def join_group(rank: int, rendezvous: str, world: int = 2) -> None:
    """In a process of ``spawn_ranks``: join its gloo group as ``rank`` (torch's file store at ``rendezvous``)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def wait_until(ready, what: str, process: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    limit_s = patience(timeout_s)
    deadline = time.monotonic() + limit_s
    while not ready():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {limit_s:.0f} s")
        time.sleep(0.25)


def stop_group(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stop ``process`` and what it started (its process group; a server started with ``start_new_session``)."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # the whole group is gone already (an outage test killed it)
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class RaySession:
    """The one Ray instance of a test session: a 2-node cluster on this machine (a head and a worker node, 1 CPU
    each, Ray's ``cluster_utils.Cluster``), so multi-node placement is real; this process is connected to it.
    Ray workers get ``env_vars``."""

    def __init__(self, env_vars: dict[str, str]) -> None:
        self.env_vars, self.cluster = env_vars, None

    def start(self) -> RaySession:
        import ray
        from ray.cluster_utils import Cluster

        # a dashboard port of its own: not Ray's default, which a test's own local Ray instance may take
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                                     "dashboard_port": free_port()})
        self.cluster.add_node(num_cpus=1)
        ray.init(address=self.cluster.address, log_to_driver=False, runtime_env={"env_vars": self.env_vars})
        return self

    def stop(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


class AutoscalingHead:
    """A Ray head on its own port with Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``: the autoscaler
    starts and stops real raylets here): the head offers no CPU, one worker type of 1 CPU, at most 2 such nodes,
    none at the start, and a GPU type whose every launch fails as EC2 fails one (``refusing_provider.py``). Ray's
    ``AutoscalingCluster`` helper reads an example config the wheel does not ship and
    runs ``ray stop --force``, which would kill every Ray process of the test session; ``stop`` kills only this
    cluster's own processes. ``env``: what a client of it needs (token authentication, as ``ray start`` sets up
    the head, with this cluster's own token: a fresh machine has no ``~/.ray/auth_token``)."""

    WORKER_TYPE = "cpu_1"
    REFUSED_TYPE = "gpu_refused"

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.config_file = Path(tempfile.mkdtemp(prefix="varcon-as-")) / "autoscaler.yaml"

    def cluster_config(self) -> dict:
        """The autoscaler's cluster config (the layout of Ray's ``fake_multi_node`` example)."""
        return {
            "cluster_name": "varcon-autoscaling-test",
            "max_workers": 2,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1,  # 6 s: nodes nobody asks for go soon after the work ends
            "provider": {"type": "external", "module": "refusing_provider.RefusingProvider",
                         "refuse": [self.REFUSED_TYPE], "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                self.WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
                self.REFUSED_TYPE: {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                    "max_workers": 1},
            },
            "head_node_type": "ray.head.default",
            "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self) -> AutoscalingHead:
        import yaml

        self.config_file.write_text(yaml.safe_dump(self.cluster_config()))
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "start", "--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1", f"--autoscaling-config={self.config_file}",
                        "--disable-usage-stats"], check=True, capture_output=True,
                       env={**self.env, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                            "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                                        os.environ.get("PYTHONPATH")]))})
        return self

    def own_processes(self) -> list:
        """The processes of this cluster: those that name the head's GCS port on their command line (the head's
        and every node's raylet and servers), and their descendants (the agents and workers they started)."""
        import psutil

        port, found = self.port, {}
        for process in psutil.process_iter(["cmdline"]):
            line = " ".join(process.info["cmdline"] or [])
            if "ray" in line and (f":{port}" in line or f"_port={port}" in line or f"--port={port}" in line):
                if process.pid != os.getpid():
                    found[process.pid] = process
                    try:
                        found.update((child.pid, child) for child in process.children(recursive=True))
                    except psutil.NoSuchProcess:
                        pass
        return list(found.values())

    def stop(self) -> None:
        import psutil

        processes = self.own_processes()
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)


def _healthy(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    return ready


class MlflowServer:
    """``varcon ui``'s command (``pipeline.tracking.ui_command``) serving ``store`` on a free loopback port, in
    its own process group (``process.pid``), so that it can be killed whole, also from another process."""

    def __init__(self, store: str) -> None:
        from pipeline.tracking import ui_command

        self.port = free_port()
        self.command = ui_command(store, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True,
                                        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_until(_healthy(self.url), f"`{' '.join(self.command)}`", self.process)
        return self

    def stop(self) -> None:
        stop_group(self.process, signal.SIGKILL)
        self.process = None


class S3Server:
    """moto's S3 server on a free loopback port; ``env`` is what a client process needs to use it (the endpoint
    through ``AWS_ENDPOINT_URL_S3``, read by pyarrow, boto3 and MLflow alike, and test credentials)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.process: subprocess.Popen | None = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def start(self) -> S3Server:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def ready() -> bool:
            try:
                self.client().list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        wait_until(ready, "moto's S3 server", self.process)
        return self

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        stop_group(self.process)
        self.process = None

    def restart(self) -> None:
        """Stop and start the server; the buckets' objects are kept (see the module docstring)."""
        client = self.client()
        kept = tempfile.mkdtemp(prefix="varcon-s3-kept-")
        buckets = [b["Name"] for b in client.list_buckets()["Buckets"]]
        objects = [(bucket, key) for bucket in buckets for key in self.keys(bucket)]  # keys may end in "/"
        for i, (bucket, key) in enumerate(objects):
            client.download_file(bucket, key, os.path.join(kept, str(i)))
        self.stop()
        self.start()
        client = self.client()
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        for i, (bucket, key) in enumerate(objects):
            client.upload_file(os.path.join(kept, str(i)), bucket, key)
        shutil.rmtree(kept)


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else where Debian's postgresql-NN package puts it."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"{name} not found: run scripts/setup.sh (it installs Debian's postgresql-15)")
    return found


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder on a free loopback port, run by the ``postgres`` user when
    the tests run as root (``initdb`` refuses root). ``uri(database)`` is a SQLAlchemy URI for MLflow."""

    USER = "varcon"

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="varcon-pg-")
        self.data = os.path.join(self.folder, "data")
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.as_owner, postgres_bin("initdb"), "-D", self.data, "-U", self.USER, "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)

    def uri(self, database: str) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        subprocess.run([*self.as_owner, postgres_bin("pg_ctl"), "-D", self.data, "-l",
                        os.path.join(self.folder, "server.log"), "-o", options, "-w", "-t", "120", "start"],
                       check=True, capture_output=True)
        return self

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.uri("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def stop(self) -> None:
        subprocess.run([*self.as_owner, postgres_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop"],
                       check=False, capture_output=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class TrackingService:
    """``mlflow server`` on PostgreSQL with its artifacts in the S3 server (``--artifacts-destination``, served
    through the tracking server), as ``cluster.yaml`` runs it."""

    ADMIN = "admin"

    def __init__(self, database_uri: str, artifacts: str, s3: S3Server | None = None, workers: int = 2,
                 auth_database_uri: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                        str(self.port), "--workers", str(workers), "--backend-store-uri", database_uri,
                        "--artifacts-destination", artifacts]
        self.env = {**os.environ, **(s3.env if s3 else {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="varcon-mlflow-server-", suffix=".log", delete=False).name
        self.admin_password = ""
        if auth_database_uri:  # MLflow's basic-auth app, its users on PostgreSQL, configured as cluster.yaml does
            self.admin_password = secrets.token_hex(16)
            config = Path(tempfile.mkdtemp(prefix="varcon-mlflow-auth-")) / "mlflow_auth.ini"
            config.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = {auth_database_uri}\n"
                              f"admin_username = {self.ADMIN}\nadmin_password = {self.admin_password}\n"
                              f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            self.command += ["--app-name", "basic-auth"]
            self.env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))

    def start(self) -> TrackingService:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

        wait_until(_healthy(self.url), f"`{' '.join(self.command)}` (log: {self.log})", self.process)
        return self

    def stop(self) -> None:
        stop_group(self.process)
        self.process = None
