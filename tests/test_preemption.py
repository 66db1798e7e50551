"""A spot node reclaimed mid-epoch: drained through Ray's drain API with reason PREEMPTION (as the spot watcher
does on EC2's notice), checkpointed within the epoch, taken away, and the run resumed from that step on a
replacement node, with ``ray.max_failures=0`` (a preemption is charged to ``ray.max_preemption_failures``).

The cluster is the test's own (``tests/preemptible_cluster.py``, a separate process): the test removes a node,
which the session's shared cluster must keep."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAULTS_FILE
from mlflow import MlflowClient
from services import patience

from pipeline import checkpoint, engine
from pipeline.config import load_config
from pipeline.data import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["ray.num_workers=1", "optim.epochs=3", "optim.warmup_epochs=0", "optim.global_batch_size=256",
            "eval.linear_probe_epochs=0", "eval.few_shot_episodes=0", "eval.knn_k=[5]", "eval.every_epochs=1",
            "tracking.system_metrics=never"]
RAY_RUN = ["ray.max_failures=0", "ray.checkpoint_every=1", "ray.preemption_check_steps=1", "name=spot"]


class PreemptibleCluster:
    """``tests/preemptible_cluster.py`` driven through its stdin."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
        env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "preemptible_cluster.py")], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.started = self.answer()

    def answer(self) -> dict:
        line = self.process.stdout.readline()
        assert line, f"the test cluster exited ({self.process.poll()})"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
            self.process.wait(timeout=patience(120))


def wait_for(path: Path, training: subprocess.Popen) -> None:
    deadline = time.monotonic() + patience(300)
    while not path.exists():
        assert training.poll() is None, f"training ended before {path.name}: {training.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {patience(300):.0f} s"
        time.sleep(0.2)


def uninterrupted_weights(home: Path) -> dict:
    """The weights after 3 epochs of the same settings in this process, one thread as the Ray worker has."""
    config = load_config(None, SETTINGS)
    files = prepare_dataset(config.data, home / "reference-data", log=lambda *_: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training = engine.fit(config, files, torch.device("cpu"), lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return {name: value.detach().clone() for name, value in training.model.state_dict().items()}


@pytest.mark.cluster
def test_a_drained_node_ends_in_a_mid_epoch_checkpoint_and_the_run_resumes_there_to_equal_weights(
        varcon_home, inject_faults):
    signals = varcon_home / "signals"
    signals.mkdir()
    inject_faults(preempt_in_epoch={"epoch": 2, "step": 2, "signals": str(signals)})
    cluster = PreemptibleCluster()
    try:
        env = {**os.environ, "RAY_ADDRESS": cluster.started["address"], "VARCON_FAULTS_FILE": FAULTS_FILE}
        training = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *SETTINGS, *RAY_RUN], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(signals / "holding", training)  # rank 0 waits at step 2 of epoch 2
            cluster.ask(f"drain {int(patience(120))}")
            wait_for(signals / "checkpointed", training)  # the notice reached the worker: checkpointed there
            replaced = cluster.ask("replace")  # the instance is reclaimed; a new one joins
            try:
                printed, _ = training.communicate(timeout=patience(600))
            except subprocess.TimeoutExpired:
                training.kill()
                pytest.fail(f"the training ran past {patience(600):.0f} s: {training.communicate()[0][-6000:]}")
        finally:
            if training.poll() is None:
                training.kill()
        assert training.returncode == 0, printed[-4000:]
    finally:
        cluster.stop()

    assert replaced["node_id"] != cluster.started["node_id"]
    assert "preemption notice: checkpointed within epoch 2 after step 2" in printed, printed[-4000:]
    epoch_lines = [line.split()[1] for line in printed.splitlines() if line.startswith("epoch ")]
    assert epoch_lines == ["0/3", "1/3", "2/3", "3/3"], printed[-4000:]  # none for the notice, none replayed
    worker_logs = "".join(p.read_text(errors="replace") for p in
                          Path(cluster.started["session_dir"], "logs").glob("worker-*.out"))
    assert "[resume] within epoch 2 after step 2" in worker_logs  # not from scratch: from the step it stopped at

    client = MlflowClient(f"sqlite:///{varcon_home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_knn_top1_k5")) == [0, 1, 2, 3]
    assert not any(run.data.metrics.get(k) is not None for k in ("preemption_step", "checkpoint_rank"))

    states = list((varcon_home / ".cache" / "ray_results").rglob(checkpoint.STATE_FILE))
    assert not list((varcon_home / ".cache" / "ray_results").rglob(checkpoint.MID_EPOCH_FILE))  # ranked below 2, 3
    (final,) = [checkpoint.load(p.parent) for p in states if checkpoint.load_record(p.parent).epoch == 3]
    for name, value in uninterrupted_weights(varcon_home).items():
        torch.testing.assert_close(final["model"][name].float(), value.float(), rtol=1e-5, atol=1e-6, msg=name)
