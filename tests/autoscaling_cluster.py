"""An autoscaling Ray cluster on this machine, run by ``tests/test_autoscaling.py`` in a process of its own:
``services.AutoscalingHead`` (Ray's fake multi-node provider: a head that offers no CPU and one worker node type of
1 CPU, at most 2 such nodes, none at the start, and a GPU type that cannot be launched), four ``varcon train``
runs against it, and the nodes counted between them.

Run: ``python autoscaling_cluster.py HOME``; prints one JSON line per step.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from services import AutoscalingHead, patience

HEAD = AutoscalingHead()


def worker_nodes(address: str) -> int:
    """Alive nodes of the worker type, as Ray's state API lists them."""
    code = ("import ray, json; ray.init(address=%r, log_to_driver=False); print(json.dumps(sum(1 for n in "
            "ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) > 0)))") % address
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=patience(120), env=HEAD.env)
    return int(done.stdout.strip().splitlines()[-1])


def varcon(home: Path, address: str, *args: str, without: str = "", **changed: str) -> subprocess.CompletedProcess:
    """``varcon ARGS`` against the cluster; ``without`` names an environment variable to leave out, ``changed``
    sets others."""
    env = {key: value for key, value in HEAD.env.items() if key != without}
    env.update(RAY_ADDRESS=address, VARCON_HOME=str(home), **changed)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=patience(600))


def report(**step) -> None:
    print(json.dumps(step), flush=True)


def main(home: Path) -> None:
    HEAD.start()
    address, config_file = HEAD.address, HEAD.config_file
    try:
        report(step="started", worker_nodes=worker_nodes(address))
        common = ["optim.epochs=1", "optim.warmup_epochs=0", "eval.linear_probe_epochs=3", "eval.few_shot_episodes=5",
                  "ray.num_workers=2", f"ray.autoscaler_config={config_file}",
                  f"ray.resource_wait_s={patience(300):.0f}"]
        no_home = home / "home-without-token"  # no ~/.ray/auth_token (a local Ray instance writes one there)
        no_home.mkdir()
        no_token = varcon(home, address, "train", *common, "name=no-token", without="RAY_AUTH_TOKEN",
                          HOME=str(no_home))
        report(step="no_token", returncode=no_token.returncode, stderr=no_token.stderr[-3000:])
        done = varcon(home, address, "train", *common, "name=autoscaled")
        report(step="trained", returncode=done.returncode, stdout=done.stdout[-20000:], stderr=done.stderr[-3000:])
        # the request withdrawn, the idle nodes go after idle_timeout_minutes
        deadline = time.monotonic() + patience(180)
        while (left := worker_nodes(address)) and time.monotonic() < deadline:
            time.sleep(3)
        report(step="after", worker_nodes=left)
        bad_source = varcon(home, address, "train", *common, "data.dataset=imagefolder", "data.root=/no/such/folder",
                            "name=bad-source")
        # the witness is the driver's output (it says whenever it asks); no node added is a weaker second one: a
        # request withdrawn at once may not have reached the autoscaler's 1 s loop
        time.sleep(patience(5))
        report(step="bad_source", returncode=bad_source.returncode, stdout=bad_source.stdout[-3000:],
               stderr=bad_source.stderr[-3000:], worker_nodes=worker_nodes(address))
        started = time.monotonic()
        too_big = varcon(home, address, "train", *common, "ray.num_workers=4", "name=too-big")
        report(step="too_big", returncode=too_big.returncode, stderr=too_big.stderr[-3000:],
               seconds=time.monotonic() - started)
        refused = varcon(home, address, "train", *common, "ray.num_workers=1", "ray.use_gpu=true", "name=refused",
                         f"ray.resource_wait_s={patience(45):.0f}")
        report(step="refused", returncode=refused.returncode, stdout=refused.stdout[-20000:],
               stderr=refused.stderr[-3000:])
    finally:
        HEAD.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
