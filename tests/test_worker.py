"""The worker loop (``pipeline.worker.run_worker``) without a Ray cluster: a session that keeps reports and
checkpoints in memory, as Ray Train or Tune would."""
import shutil
import tempfile

import pytest
from ray.train import Checkpoint

from pipeline import checkpoint, faults
from pipeline.config import load_config
from pipeline.identity import identity_digest
from pipeline.names import DIVERGED, EPOCH
from pipeline.record import read_record
from pipeline.worker import run_worker, worker_argument

SHORT = ["ray.num_workers=1", "optim.epochs=2", "optim.warmup_epochs=0", "eval.linear_probe_epochs=0",
         "eval.few_shot_episodes=0", "eval.knn_k=[5]"]


class InMemorySession:
    """Reports in a list, checkpoints copied into a folder of their own (like Ray's storage)."""

    def __init__(self, restore: Checkpoint | None = None) -> None:
        self.reports, self.checkpoints, self.restore = [], [], restore

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir:
            kept = tempfile.mkdtemp(prefix="varcon-test-checkpoint-")
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
            self.checkpoints.append(Checkpoint.from_directory(kept))

    def last_checkpoint(self):
        return self.restore

    def rank(self):
        return 0

    def device(self):
        import torch

        return torch.device("cpu")

    def wrap_model(self, model):
        return model


def argument(config, digits_files, run_id, run_key):
    return worker_argument(config, digits_files, run_id, run_key, identity_digest(config))


def test_the_record_holds_every_epoch_and_an_exploit_continues_the_lineage(digits_files):
    config = load_config(None, SHORT)
    donor = InMemorySession()
    assert run_worker(argument(config, digits_files, "run-a", "trial-a"), donor) is None
    assert [r[EPOCH] for r in donor.reports] == [0, 1, 2] and len(donor.checkpoints) == 2
    record = read_record(donor.checkpoints[-1])  # through the checkpoint's own filesystem
    assert record.run_id == "run-a" and record.epoch == 2 and {e[0] for e in record.entries} == {0, 1, 2}
    assert {e[0] for e in read_record(donor.checkpoints[0]).entries} == {0, 1}  # each checkpoint: up to its epoch

    exploiting = InMemorySession(restore=donor.checkpoints[0])  # another trial continues from a's epoch 1
    run_worker(argument(config, digits_files, "run-b", "trial-b"), exploiting)
    assert [r[EPOCH] for r in exploiting.reports] == [2]
    record = read_record(exploiting.checkpoints[-1])
    assert record.run_id == "run-b" and record.exploits == [{"epoch": 1, "donor_run_id": "run-a"}]
    assert {e[0] for e in record.own_entries()} == {2}  # epochs 0-1 are a's, never sent to b's run
    assert sorted({e[0] for e in record.entries}) == [0, 1, 2]  # but they describe b's weights


def test_a_checkpoint_of_the_same_run_key_under_another_mlflow_run_is_refused(digits_files):
    """Not a PBT exploit: the tracking store changed under a running sweep."""
    config = load_config(None, SHORT[:-1] + ["optim.epochs=1"])
    first = InMemorySession()
    run_worker(argument(config, digits_files, "run-a", "trial-a"), first)
    with pytest.raises(RuntimeError, match="belongs to MLflow run run-a, which this tracking store does not hold"):
        run_worker(argument(config, digits_files, "run-new", "trial-a"), InMemorySession(first.checkpoints[-1]))


def test_divergence_is_reported_once_more_and_returned(digits_files, inject_faults):
    inject_faults(nan_after_epoch=1)
    session = InMemorySession()
    reason = run_worker(argument(load_config(None, SHORT), digits_files, "run-a", "nan"), session)
    assert "training loss became nan at epoch 2" in reason
    assert session.reports[-1][DIVERGED] == reason and session.reports[-1][EPOCH] == 1
    assert [checkpoint.load_record(c.path).epoch for c in session.checkpoints] == [1]


def test_faults_reach_only_the_runs_they_name(inject_faults):
    inject_faults(nan_after_epoch=1, runs=[2])
    assert faults.for_run("first") == {}
    assert faults.for_run("second")["nan_after_epoch"] == 1
    assert faults.for_run("third") == {} and faults.for_run("second")["nan_after_epoch"] == 1  # same answer again
    inject_faults()
    assert faults.for_run("second") == {}
