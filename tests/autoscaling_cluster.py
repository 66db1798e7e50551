"""An autoscaling Ray cluster on this machine, run by ``tests/test_autoscaling.py`` in a process of its own:
Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``: the autoscaler starts and stops real raylets here) with a
head that offers no CPU and one worker node type of 1 CPU, at most 2 such nodes. It starts with no worker node.

Ray's ``AutoscalingCluster`` helper reads an example config that the wheel does not ship and runs
``ray stop --force``, which would kill every Ray process of the test session; this starts the same kind of
cluster on its own port and stops only its own processes.

Run: ``python autoscaling_cluster.py HOME``; prints one JSON line per step.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from services import free_port

WORKER_TYPE = "cpu_1"
# as `ray start` sets up the head, with this test's own token (a fresh machine has no ~/.ray/auth_token)
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def cluster_config(port: int) -> dict:
    """The autoscaler's cluster config for the fake provider (the layout of Ray's ``fake_multi_node`` example)."""
    return {
        "cluster_name": "varcon-autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s: nodes nobody asks for go soon after the work ends
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def own_processes(port: int) -> list[psutil.Process]:
    """The processes of this cluster: those that name the head's GCS port on their command line (the head's and
    every node's raylet and servers), and their descendants (the agents and workers they started)."""
    found: dict[int, psutil.Process] = {}
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


def worker_nodes(address: str) -> int:
    """Alive nodes of the worker type, as Ray's state API lists them."""
    code = ("import ray, json; ray.init(address=%r, log_to_driver=False); print(json.dumps(sum(1 for n in "
            "ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) > 0)))") % address
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    return int(done.stdout.strip().splitlines()[-1])


def varcon(home: Path, address: str, *args: str) -> subprocess.CompletedProcess:
    env = {**ENV, "RAY_ADDRESS": address, "VARCON_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def report(**step) -> None:
    print(json.dumps(step), flush=True)


def main(home: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    config_file = Path(tempfile.mkdtemp(prefix="varcon-as-")) / "autoscaler.yaml"
    config_file.write_text(yaml.safe_dump(cluster_config(port)))
    env = {**ENV, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1",
                    f"--autoscaling-config={config_file}", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True)
    try:
        report(step="started", worker_nodes=worker_nodes(address))
        common = ["optim.epochs=1", "optim.warmup_epochs=0", "eval.linear_probe_epochs=3", "eval.few_shot_episodes=5",
                  "ray.num_workers=2", f"ray.autoscaler_config={config_file}", "ray.resource_wait_s=300"]
        done = varcon(home, address, "train", *common, "name=autoscaled")
        report(step="trained", returncode=done.returncode, stdout=done.stdout[-20000:], stderr=done.stderr[-3000:])
        deadline = time.monotonic() + 180  # the request withdrawn, the idle nodes go after idle_timeout_minutes
        while (left := worker_nodes(address)) and time.monotonic() < deadline:
            time.sleep(3)
        report(step="after", worker_nodes=left)
        started = time.monotonic()
        too_big = varcon(home, address, "train", *common, "ray.num_workers=4", "name=too-big")
        report(step="too_big", returncode=too_big.returncode, stderr=too_big.stderr[-3000:],
               seconds=time.monotonic() - started)
    finally:
        processes = own_processes(port)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
