"""The autoscaler gets asked: a training on a Ray cluster that starts with no worker node (Ray's fake multi-node
provider, in a process of its own: ``tests/autoscaling_cluster.py``) makes the autoscaler add the nodes it needs,
trains, and withdraws its request, so the nodes go idle and are removed; what exceeds the cluster's maximum is
refused at once with one line, as is a source that is not there, before anything is asked; a node type whose
launches fail shows the autoscaler's reason on the console; a driver without the cluster's token is one line."""
import json
import os
import subprocess
import sys

import pytest
from refusing_provider import CATEGORY, DESCRIPTION
from services import patience

HERE = os.path.dirname(__file__)


@pytest.mark.cluster
def test_a_training_makes_the_autoscaler_add_nodes_and_an_impossible_one_is_refused_at_once(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(HERE, "autoscaling_cluster.py"), str(tmp_path)], cwd=HERE,
                          capture_output=True, text=True, timeout=patience(840))
    assert done.returncode == 0, done.stderr[-4000:]
    steps = {step["step"]: step for step in map(json.loads, done.stdout.strip().splitlines())}
    assert steps["started"]["worker_nodes"] == 0  # the head offers no CPU: nothing can train before scaling up
    no_token = steps["no_token"]  # the head runs with RAY_AUTH_MODE=token; a driver with no token: one line
    assert no_token["returncode"] == 2, no_token["stderr"]
    (line,) = no_token["stderr"].strip().splitlines()
    assert line.startswith("varcon: error: cannot join the Ray cluster at ") and "RAY_AUTH_MODE=token" in line
    trained = steps["trained"]
    assert trained["returncode"] == 0, trained["stderr"]
    assert "asked the autoscaler for 2 bundles (2 CPU, 0 GPU)" in trained["stdout"]
    (held,) = [line for line in trained["stdout"].splitlines() if line.startswith("the cluster holds the run after")]
    assert held.endswith(" min: 2 CPU, 0 GPU")  # the two worker nodes the request added
    assert "== autoscaled: varcon on digits, 1 epochs, 2 Ray Train workers ==" in trained["stdout"]
    assert [line.split()[1] for line in trained["stdout"].splitlines() if line.startswith("epoch ")] == ["0/1", "1/1"]
    assert "TrainingReport(" not in trained["stdout"] + trained["stderr"]
    assert steps["after"]["worker_nodes"] == 0  # the request was withdrawn: idle nodes were removed
    bad_source = steps["bad_source"]  # a source neither visible nor prepared: refused before anything is asked
    assert bad_source["returncode"] == 2 and "data.root=/no/such/folder is not visible here" in bad_source["stderr"]
    assert "asked the autoscaler" not in bad_source["stdout"] and bad_source["worker_nodes"] == 0
    too_big = steps["too_big"]
    assert too_big["returncode"] == 2
    (line,) = too_big["stderr"].strip().splitlines()
    assert line.startswith("varcon: error: the run needs 4 CPU but ") and "can grow to 2 CPU at most" in line
    refused = steps["refused"]  # the GPU type's launches fail as EC2 refuses one: said on the console, then refused
    assert refused["returncode"] == 2, refused["stderr"]
    failure = f"gpu_refused node: {CATEGORY}: {DESCRIPTION}"
    assert [line for line in refused["stdout"].splitlines() if "could not launch" in line] == [
        f"the autoscaler could not launch a {failure}"]
    (line,) = refused["stderr"].strip().splitlines()
    assert "did not add the nodes within" in line and f"its last launch failure: gpu_refused: {CATEGORY}" in line
