"""Ray Train callbacks, run in Ray Train's controller process: they import Ray Train, the run record and the
metric forwarding, not torch or the engine, so the controller starts without them.

``RecordForwarder`` sends each persisted checkpoint's new record entries to MLflow (``RecordForwarding``);
``ReportSender`` puts rank 0's reports on a queue the driver's console reads (``pipeline.console.report_queue``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.train import UserCallback

from pipeline.metric_forwarding import RecordForwarding

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.context import TrainRunContext  # the type Ray's UserCallback declares
    from ray.util.queue import Queue


class RecordForwarder(UserCallback):
    """``RecordForwarding`` on Ray Train's report stream."""

    def __init__(self, tracking_uri: str) -> None:
        self.forwarding = RecordForwarding(tracking_uri)

    def after_report(self, run_context: TrainRunContext, metrics: list[dict[str, Any]],
                     checkpoint: Checkpoint | None = None) -> None:
        if checkpoint is not None:
            self.forwarding.forward(checkpoint)


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
