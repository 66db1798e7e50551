"""What a trial's Ray Train run tells Tune: epochs, never a report made within one (a preemption checkpoint), each
handed to Tune in order from the trial's own thread while the training runs; and the Tune checkpoint that names a
population trial's Train checkpoint."""
import threading
import time

import pytest
from ray.util.queue import Empty

from pipeline.names import EPOCH, PREEMPTION_STEP
from pipeline.ray_callbacks import TrialReportSender
from pipeline.storage import location
from tune.train_reports import POINTER_FILE, Handover, pointed_to, relay


class ListQueue(list):
    """The queue's interface on a list (``ray.util.queue.Queue`` needs a running Ray)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def put(self, item):
        with self.lock:
            self.append(item)

    def get(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self:
                    return self.pop(0)
            time.sleep(0.01)
        raise Empty

    def empty(self):
        with self.lock:
            return not self


class Stored:
    path = "/runs/trial/checkpoint_000003"


def test_a_report_within_an_epoch_is_no_tune_result():
    queue = ListQueue()
    callback = TrialReportSender(queue)
    callback.after_report(None, [{EPOCH: 1, "train_loss": 2.0}, {EPOCH: 1}], None)
    callback.after_report(None, [{EPOCH: 1, "train_loss": 2.0, PREEMPTION_STEP: 7}], Stored())
    callback.after_report(None, [{EPOCH: 2, "train_loss": 1.5}], Stored())
    assert queue == [({EPOCH: 1, "train_loss": 2.0}, None),
                     ({EPOCH: 2, "train_loss": 1.5}, "/runs/trial/checkpoint_000003")]


def test_relay_hands_over_every_report_in_order_then_returns_what_the_training_returned():
    queue, handed = ListQueue(), []

    def train():
        for epoch in range(1, 4):
            time.sleep(0.05)  # reports arrive while the trial's thread waits
            queue.put(({EPOCH: epoch}, f"/c{epoch}" if epoch % 2 else None))
        return "trained"

    assert relay(train, queue, lambda metrics, path: handed.append((metrics[EPOCH], path)), poll_s=0.02) == "trained"
    assert handed == [(1, "/c1"), (2, None), (3, "/c3")]


def test_relay_raises_what_the_training_raised_after_the_reports_it_made():
    queue, handed = ListQueue(), []

    def train():
        queue.put(({EPOCH: 1}, None))
        raise ValueError("no nodes")

    with pytest.raises(ValueError, match="no nodes"):
        relay(train, queue, lambda metrics, path: handed.append(metrics[EPOCH]), poll_s=0.02)
    assert handed == [1]


def test_a_population_pointer_names_the_train_checkpoint_it_was_reported_with(tmp_path, monkeypatch):
    """The Tune checkpoint a population trial reports names the Train checkpoint (``pointed_to`` reads it back);
    a FIFO/ASHA trial reports metrics only."""
    import shutil

    import ray.tune

    reported = []

    def report(metrics, checkpoint=None):  # Tune copies the checkpoint's files before report returns
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"tune-checkpoint-{len(reported)}"
            shutil.copytree(checkpoint.path, kept)
        reported.append((metrics, kept))

    monkeypatch.setattr(ray.tune, "report", report)
    train_checkpoint = str(tmp_path / "t-1-ab12cd34" / "checkpoint_000001")
    Handover(True, location(str(tmp_path))).report({EPOCH: 2}, train_checkpoint)
    ((metrics, kept),) = reported
    assert metrics == {EPOCH: 2, "checkpoint_path": train_checkpoint} and sorted(p.name for p in kept.iterdir()) == [
        POINTER_FILE]
    assert pointed_to(ray.tune.Checkpoint.from_directory(kept)) == train_checkpoint
    Handover(True, location(str(tmp_path))).report({EPOCH: 3}, None)  # an epoch without a checkpoint
    Handover(False, location(str(tmp_path))).report({EPOCH: 3}, train_checkpoint)
    assert [kept for _, kept in reported[1:]] == [None, None]


def test_a_finished_population_trial_keeps_only_the_segments_that_hold_its_kept_checkpoints(tmp_path):
    from pipeline.config import load_config
    from pipeline.record import RunRecord
    from pipeline.train_job import Checkpointed, RunPlan
    from tune.train_reports import drop_other_segments

    plan = RunPlan.of(load_config(None, [f"ray.storage_path={tmp_path}", "ray.run_name=t-1"]), own_checkpoints=False)
    for name in ("t-1-0123abcd", "t-1-89efcdab", "t-1-final", "t-10-0123abcd"):
        (tmp_path / name / "checkpoint_000000").mkdir(parents=True)
    kept = [Checkpointed(location(str(tmp_path / "t-1-89efcdab" / "checkpoint_000000")), RunRecord("r", "t-1", "i"))]
    dropped = drop_other_segments(plan, kept)
    assert [folder.name for folder in dropped] == ["t-1-0123abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-1-89efcdab", "t-1-final", "t-10-0123abcd"]
