"""The worker loop (``pipeline.worker.run_worker``) without a Ray cluster: a session that keeps reports and
checkpoints in memory, as Ray Train or Tune would."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from ray.train import Checkpoint

from pipeline import checkpoint, faults
from pipeline.config import load_config
from pipeline.data.manifest import sha256_of
from pipeline.identity import identity_digest
from pipeline.names import CHECKPOINT_RANK, DIVERGED, EPOCH, MID_EPOCH_RANK, PREEMPTION_STEP
from pipeline.record import read_record
from pipeline.worker import run_worker, worker_argument

SHORT = ["ray.num_workers=1", "optim.epochs=2", "optim.warmup_epochs=0", "eval.linear_probe_epochs=0",
         "eval.few_shot_episodes=0", "eval.knn_k=[5]"]


class InMemorySession:
    """Reports in a list, checkpoints copied into a folder of their own (like Ray's storage); a preemption notice
    from the ``notice_from``-th ask on (never by default)."""

    def __init__(self, restore: Checkpoint | None = None, notice_from: int | None = None) -> None:
        self.reports, self.checkpoints, self.restore = [], [], restore
        self.persisted_now, self.asks, self.notice_from = [], 0, notice_from

    def report(self, metrics, checkpoint_dir, persist_now=False):
        self.reports.append(metrics)
        self.persisted_now.append(persist_now)
        if checkpoint_dir:
            kept = tempfile.mkdtemp(prefix="varcon-test-checkpoint-")
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
            self.checkpoints.append(Checkpoint.from_directory(kept))

    def preemption_notice(self):
        self.asks += 1
        return self.notice_from is not None and self.asks >= self.notice_from

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
    donor_state = sha256_of(Path(donor.checkpoints[0].path) / checkpoint.STATE_FILE)
    assert record.run_id == "run-b" and record.exploits == [  # which state, by content: the lineage's provenance
        {"epoch": 1, "donor_run_id": "run-a", "donor_checkpoint": donor.checkpoints[0].path,
         "donor_state_sha256": donor_state}]
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
    inject_faults(runs={2: {"nan_after_epoch": 1}, 3: {"fail_after_epoch": 2}})  # each run its own
    assert [faults.for_run(key) for key in ("first", "second", "third", "second")] == [
        {}, {"nan_after_epoch": 1}, {"fail_after_epoch": 2}, {"nan_after_epoch": 1}]


def test_a_notice_checkpoints_within_the_epoch_and_the_resume_ends_where_an_uninterrupted_run_does(digits_files):
    import torch

    config = load_config(None, SHORT + ["optim.epochs=3", "optim.global_batch_size=256", "ray.checkpoint_every=2",
                                        "ray.preemption_check_steps=1"])
    reference = InMemorySession()
    run_worker(argument(config, digits_files, "run-a", "trial-a"), reference)
    # 4 steps an epoch: asks after steps 1-3 and at the epoch's end
    assert [r[EPOCH] for r in reference.reports] == [0, 1, 2, 3] and reference.asks == 12

    noticed = InMemorySession(notice_from=6)  # the notice comes at step 2 of epoch 2
    run_worker(argument(config, digits_files, "run-a", "trial-a"), noticed)
    assert [r.get(PREEMPTION_STEP) for r in noticed.reports] == [None, None, 2, None, None]
    mid = noticed.reports[2]
    assert mid[EPOCH] == 1 and mid[CHECKPOINT_RANK] == MID_EPOCH_RANK  # the last epoch's metrics, ranked last
    assert noticed.persisted_now == [False, False, True, True, True]  # stored at once from the notice on
    assert noticed.asks == 6  # the notice is remembered, not asked again
    # epoch 3 is checkpointed although ray.checkpoint_every=2: the node is going
    records = [read_record(c) for c in noticed.checkpoints]
    assert [r.epoch for r in records] == [1, 2, 3]
    mid_folder = noticed.checkpoints[0].path
    assert json.loads((Path(mid_folder) / checkpoint.MID_EPOCH_FILE).read_text()) == {"epoch": 2, "step": 2}
    assert all(CHECKPOINT_RANK in r for r in noticed.reports if r.get(EPOCH, 0) >= 2)

    resumed = InMemorySession(restore=noticed.checkpoints[0])  # the node went: a new worker group
    run_worker(argument(config, digits_files, "run-a", "trial-a"), resumed)
    assert [r[EPOCH] for r in resumed.reports] == [2, 3]
    want, got = (checkpoint.load(s.checkpoints[-1].path) for s in (reference, resumed))
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name].float(), value.float(), rtol=1e-5, atol=1e-6, msg=name)
    for epoch in (2, 3):
        assert resumed.reports[epoch - 2]["train_loss"] == pytest.approx(reference.reports[epoch]["train_loss"],
                                                                         rel=1e-5)


def test_epochs_shorter_than_the_check_cadence_are_asked_within_and_at_their_end(digits_files):
    config = load_config(None, SHORT + ["optim.epochs=3", "optim.global_batch_size=256", "ray.checkpoint_every=3",
                                        "ray.checkpoint_at_epochs=[1]", "ray.preemption_check_steps=3"])
    session = InMemorySession(notice_from=4)  # asks: epoch 1 step 3, its end, epoch 2 step 2 (global 6), its end
    run_worker(argument(config, digits_files, "run-a", "trial-a"), session)
    assert [r.get(PREEMPTION_STEP) for r in session.reports] == [None, None, None, None]
    # epoch 1 is listed in ray.checkpoint_at_epochs; noticed at epoch 2's end: 2 and 3 checkpointed
    assert session.asks == 4 and [read_record(c).epoch for c in session.checkpoints] == [1, 2, 3]
    assert session.persisted_now == [False, False, True, True]
    early = InMemorySession(notice_from=3)
    run_worker(argument(config, digits_files, "run-a", "trial-a"), early)
    assert [r.get(PREEMPTION_STEP) for r in early.reports] == [None, None, 2, None, None]  # global step 6
