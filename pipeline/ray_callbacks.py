"""Ray Train callbacks, run in Ray Train's controller process: they import Ray Train, the run record and the
metric forwarding, not torch or the engine, so the controller starts without them.

``RecordForwarder`` sends each persisted checkpoint's new record entries to MLflow (``RecordForwarding``);
``ReportSender`` puts rank 0's reports on a queue the driver's console reads (``pipeline.console.report_queue``);
``TrialReportSender`` puts each epoch's report on the queue a sweep trial hands to Tune (``tune.train_reports``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.train import UserCallback

from pipeline.metric_forwarding import RecordForwarding
from pipeline.names import PREEMPTION_STEP

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.context import TrainRunContext  # the type Ray's UserCallback declares
    from ray.util.queue import Queue


SENT_BEFORE_NEXT_S = 10.0  # how long a checkpoint's metrics may hold up the next report, where they must


class RecordForwarder(UserCallback):
    """``RecordForwarding`` on Ray Train's report stream. ``sent_before_next``: each checkpoint's metrics are sent
    before the next report is taken (up to ``SENT_BEFORE_NEXT_S``, not while the store is down): a population
    trial's run ends without warning when its scheduler pauses it, and the entries of an epoch before an exploit are
    in no later checkpoint of the trial's own."""

    def __init__(self, tracking_uri: str, sent_before_next: bool = False) -> None:
        self.forwarding, self.sent_before_next = RecordForwarding(tracking_uri), sent_before_next

    def after_report(self, run_context: TrainRunContext, metrics: list[dict[str, Any]],
                     checkpoint: Checkpoint | None = None) -> None:
        if checkpoint is not None:
            self.forwarding.forward(checkpoint)
            if self.sent_before_next:
                self.forwarding.flush(SENT_BEFORE_NEXT_S, while_failing=False)


class ReportSender(UserCallback):
    """Puts rank 0's report on ``queue`` (a ``ray.util.queue.Queue``): the report stream reaches the controller
    only, the console runs on the driver."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: TrainRunContext, metrics: list[dict[str, Any]],
                     checkpoint: Checkpoint | None = None) -> None:
        if metrics:
            try:
                self.queue.put_nowait(dict(metrics[0]))
            except Exception:  # noqa: BLE001 - a full or gone queue costs console lines, never the training
                pass


class TrialReportSender(UserCallback):
    """Rank 0's report and the persisted checkpoint's path (or ``None``) onto ``queue`` (a ``ray.util.queue.Queue``
    of one item: the controller waits until the trial took the last one), epochs only: a report made within an epoch
    (a checkpoint on a preemption notice, ``PREEMPTION_STEP``) is no result, so a scheduler (ASHA's rungs, a stopper)
    never sees it as one more iteration."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: TrainRunContext, metrics: list[dict[str, Any]],
                     checkpoint: Checkpoint | None = None) -> None:
        if not metrics or PREEMPTION_STEP in metrics[0]:
            return
        self.queue.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))
