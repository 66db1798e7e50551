"""What a trial's Ray Train run tells Tune: epochs, never a report made within one (a preemption checkpoint)."""
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from pipeline.names import EPOCH, PREEMPTION_STEP
from tune.train_reports import EpochReportsToTune


class Queue(list):
    def put(self, item):
        self.append(item)


class Stored:
    path = "/runs/trial/checkpoint_000003"


def test_a_report_within_an_epoch_is_no_tune_result():
    callback = EpochReportsToTune.__new__(EpochReportsToTune)  # its __init__ needs a Tune session's queue
    callback._training_actor_item_queue = queue = Queue()
    callback.after_report(None, [{EPOCH: 1, "train_loss": 2.0}, {EPOCH: 1}], None)
    callback.after_report(None, [{EPOCH: 1, "train_loss": 2.0, PREEMPTION_STEP: 7}], Stored())
    callback.after_report(None, [{EPOCH: 2, "train_loss": 1.5}], Stored())
    assert queue == [{EPOCH: 1, "train_loss": 2.0},
                     {EPOCH: 2, "train_loss": 1.5, CHECKPOINT_PATH_KEY: "/runs/trial/checkpoint_000003"}]
