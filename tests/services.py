"""Real servers on loopback for the tests of cluster storage and durable tracking, each started and stopped by
the tests: an S3-compatible server (moto's server mode), a throw-away PostgreSQL cluster (the Debian package's
binaries; ``initdb`` refuses root, so as the ``postgres`` user via ``runuser``), and ``mlflow server`` on
PostgreSQL with its artifacts in the S3 server, proxied (clients need no bucket credentials).

moto keeps its objects in memory. A bucket outlives any server that fronts it, so ``S3Server.restart`` keeps the
bucket's objects across the restart (it copies every object out before stopping and back in after starting):
what is restarted is the service, as with a real one.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, what: str, process: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.25)


def stop_group(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


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

    def __init__(self, database_uri: str, artifacts: str, s3: S3Server | None = None, workers: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                        str(self.port), "--workers", str(workers), "--backend-store-uri", database_uri,
                        "--artifacts-destination", artifacts]
        self.env = {**os.environ, **(s3.env if s3 else {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="varcon-mlflow-server-", suffix=".log", delete=False).name

    def start(self) -> TrackingService:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, f"`{' '.join(self.command)}` (log: {self.log})", self.process)
        return self

    def stop(self) -> None:
        stop_group(self.process)
        self.process = None
