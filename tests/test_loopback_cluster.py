"""A real ``ray up`` of ``cluster.yaml`` on loopback: Ray's local node provider over SSH (an ``sshd`` on 127.0.0.1,
reached through an ``nc`` proxy command) to a throw-away unprivileged Unix user with a temporary home, so that
nothing ``ray up`` writes lands in a real home and nothing its commands stop can be another user's. The cluster runs
``cluster.yaml``'s own node set-up, file mounts and start commands (taken from that file, not copied); only the
provider, the node types (the local provider refuses ``available_node_types``), the project's mount and the files
under ``~/.varcon`` differ. Then a training submitted with ``ray job submit`` lands in the head's MLflow (basic-auth,
on the test PostgreSQL, artifacts in the S3 server) with its metrics, a submit without the cluster's token is refused,
and ``ray down`` leaves no process of the node's user.

The node reuses the developer environment as a prebuilt one (``VARCON_PREBUILT_VENV``: ``scripts/setup.sh`` builds it
on the OS's Python, which the node's user can run, and stamps it as ``scripts/node_setup.sh`` does), as a node image
would offer it: building the CUDA torch stack for each run would take minutes of the suite.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from services import free_port, patience

from pipeline.config import REPO_ROOT

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(os.geteuid() != 0, reason="creates and removes a Unix user: needs root (CI is)")]

VENV_BIN = Path(sys.executable).parent
TRAIN = ["varcon", "train", "name=loopback", "optim.epochs=2", "optim.warmup_epochs=0", "eval.linear_probe_epochs=5",
         "eval.few_shot_episodes=10"]


def run(command: list[str], env: dict, timeout_s: float, log: Path | None = None) -> subprocess.CompletedProcess:
    """``command`` from the repository root with ``env``; its output kept in ``log`` (appended) when one is given."""
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=patience(timeout_s))
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    return done


def ok(done: subprocess.CompletedProcess) -> str:
    output = (done.stdout + done.stderr)[-5000:]
    assert done.returncode == 0, f"`{' '.join(done.args)}` exited {done.returncode}:\n{output}"
    return done.stdout


class NodeUser:
    """An unprivileged Unix user with a temporary home (the node's ``ubuntu``), its own ``TMPDIR`` (Ray's temporary
    folder and the local provider's state are per user, as on a node of one user), and an ``sshd`` on a loopback port
    that lets only this user in, by key."""

    def __init__(self, folder: Path) -> None:
        self.name = f"vl{secrets.token_hex(4)}"
        self.home = Path(tempfile.gettempdir()) / self.name  # short: Ray's socket paths live under it
        self.folder = folder  # the test's side: keys, sshd's files
        subprocess.run(["useradd", "--create-home", "--home-dir", str(self.home), "--shell", "/bin/bash",
                        "--user-group", "--password", "*", self.name], check=True, capture_output=True)
        self.uid = pwd.getpwnam(self.name).pw_uid
        (self.home / "tmp").mkdir()
        with (self.home / ".bashrc").open("a") as bashrc:
            bashrc.write('\nexport TMPDIR="$HOME/tmp"\n')
        self.key = folder / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        ssh = self.home / ".ssh"
        ssh.mkdir(mode=0o700)
        shutil.copy(f"{self.key}.pub", ssh / "authorized_keys")
        subprocess.run(["chown", "-R", f"{self.name}:{self.name}", str(self.home)], check=True)
        self.port = free_port()
        self.sshd: subprocess.Popen | None = None
        self.passed: list[Path] = []

    def may_pass_to(self, folder: Path) -> None:
        """Lets this user pass through every folder above ``folder`` that others may not (a checkout under /root,
        say): an ACL entry for this user alone (setfacl), removed by ``remove``."""
        for parent in reversed(folder.resolve().parents):
            if not parent.stat().st_mode & 0o001:
                subprocess.run(["setfacl", "-m", f"u:{self.name}:x", str(parent)], check=True)
                self.passed.append(parent)

    def start_sshd(self) -> None:
        host_key = self.folder / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        config = self.folder / "sshd_config"
        config.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
                          f"PidFile {self.folder}/sshd.pid\nAllowUsers {self.name}\nPermitRootLogin no\n"
                          "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                          "AuthorizedKeysFile .ssh/authorized_keys\nSubsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                     stdout=(self.folder / "sshd.log").open("w"), stderr=subprocess.STDOUT)

    def processes(self) -> list[str]:
        listed = subprocess.run(["ps", "-u", str(self.uid), "-o", "pid=,args="], capture_output=True, text=True)
        return [line.strip() for line in listed.stdout.splitlines() if line.strip()]

    def remove(self) -> None:
        if self.sshd is not None:
            self.sshd.terminate()
            self.sshd.wait(timeout=30)
        subprocess.run(["pkill", "-KILL", "-u", str(self.uid)], check=False)  # only after a failed test
        for _ in range(100):
            if not self.processes():
                break
            time.sleep(0.1)
        for parent in self.passed:
            subprocess.run(["setfacl", "-x", f"u:{self.name}", str(parent)], check=False)
        subprocess.run(["userdel", "--remove", self.name], check=False, capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def loopback_config(base: dict, user: NodeUser, name: str) -> dict:
    """``cluster.yaml`` with the local provider in place of AWS's: its set-up, start commands, file mounts and
    exclusions as they are."""
    kept = ("file_mounts", "rsync_exclude", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
            "initialization_commands", "head_setup_commands", "worker_setup_commands")
    config = {key: base[key] for key in kept if key in base}
    config.update(cluster_name=name, max_workers=0, idle_timeout_minutes=1,
                  provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
                  auth={"ssh_user": user.name, "ssh_private_key": str(user.key),
                        "ssh_proxy_command": f"nc 127.0.0.1 {user.port}"})
    return config


def test_ray_up_on_loopback_runs_cluster_yaml_and_a_submitted_training_lands_in_the_heads_mlflow(
        tmp_path, s3, tracking_service):
    _, database = tracking_service
    base = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    user = NodeUser(tmp_path)
    name = f"varcon-loop-{secrets.token_hex(3)}"
    bucket = s3.create_bucket(f"{name}-artifacts")
    mlflow_port, dashboard_port = free_port(), free_port()
    admin_password, token = secrets.token_hex(16), secrets.token_hex(32)

    # The submitting machine's home: the per-cluster files file_mounts copies, the token, and nothing else.
    laptop = tmp_path / "laptop"
    varcon_dir = laptop / ".varcon"
    varcon_dir.mkdir(parents=True)
    (varcon_dir / "cluster.env").write_text(
        f"VARCON_SHARED_FS=\nVARCON_MLFLOW_ARTIFACTS=s3://{bucket}/mlflow\nMLFLOW_S3_ENDPOINT_URL={s3.endpoint}\n"
        f"VARCON_MLFLOW_HOST=127.0.0.1\nVARCON_MLFLOW_PORT={mlflow_port}\nVARCON_MLFLOW_WORKERS=1\n"
        f"VARCON_RAY_PORT={free_port()}\nVARCON_DASHBOARD_PORT={dashboard_port}\n"
        f"VARCON_RAY_CLIENT_PORT={free_port()}\nVARCON_OBJECT_MANAGER_PORT={free_port()}\n"
        f"VARCON_DASHBOARD_AGENT_PORT={free_port()}\n"
        f"VARCON_PREBUILT_VENV={VENV_BIN.parent}\n")
    (varcon_dir / "mlflow_database_uri").write_text(database.create_database(f"{name}_runs".replace("-", "_")))
    (varcon_dir / "mlflow_auth.ini").write_text(
        f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = {database.create_database(f'{name}_users'.replace('-', '_'))}\n"
        f"admin_username = admin\nadmin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    (varcon_dir / "mlflow_secret_key").write_text(secrets.token_hex(16))
    (varcon_dir / "mlflow_credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = {admin_password}\n")
    (varcon_dir / "ray_auth_token").write_text(token)
    (laptop / ".ray").mkdir()
    (laptop / ".ray" / "auth_token").write_text(token)  # where the README has the user put it
    # the node's bucket credentials, as an instance profile would give them
    aws = user.home / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    (aws / "config").write_text("[default]\nregion = us-east-1\n")
    subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(aws)], check=True)

    cluster_file = tmp_path / "loopback.yaml"
    cluster_file.write_text(yaml.safe_dump(loopback_config(base, user, name)))
    (laptop / "tmp").mkdir()
    env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": str(laptop), "TMPDIR": str(laptop / "tmp"),
           "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "launcher.log"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    down = False
    try:
        user.may_pass_to(VENV_BIN.parent)
        user.start_sshd()
        ok(run(["ray", "up", "--yes", "--no-config-cache", str(cluster_file)], env, 600, log))

        # The cluster's own token, as the README has the submitting machine hold it: the training runs.
        submitted = ok(run(["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--", *TRAIN],
                           {**env, "RAY_AUTH_MODE": "token"}, 600, log))
        assert "succeeded" in submitted, submitted[-3000:]
        # Without it the head refuses the submit.
        bare = tmp_path / "bare-home"
        bare.mkdir()
        refused = run(["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--", "true"],
                      {**env, "HOME": str(bare)}, 120, log)
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "401" in refused.stdout + refused.stderr or "nauthorized" in refused.stdout + refused.stderr, (
            refused.stdout + refused.stderr)[-3000:]

        # The run is in the head's MLflow, behind its basic-auth app, with the training's metrics.
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin_password)
        try:
            (run_info,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
            steps = sorted(m.step for m in client.get_metric_history(run_info.info.run_id, "val_knn_top1_k20"))
        finally:
            for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(variable)
        assert run_info.info.status == "FINISHED" and steps == [0, 1, 2], (run_info.info.status, steps)
        assert s3.keys(bucket, "mlflow/"), "no artifact reached the bucket through the tracking server"

        ok(run(["ray", "down", "--yes", str(cluster_file)], env, 300, log))
        down = True
        # `ray down` ends Ray on the node; the start command's supervisor then stops the tracking server. What is left
        # for a moment is the launcher's SSH connection, which closes 10 s after its last use (ControlPersist).
        deadline = time.monotonic() + patience(60)
        while user.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert user.processes() == [], user.processes()
    finally:
        if not down:
            run(["ray", "down", "--yes", str(cluster_file)], env, 300, log)
        user.remove()
        print(log.read_text()[-20000:] if log.exists() else "")
