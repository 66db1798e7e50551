"""Metrics on their way to MLflow without blocking anyone: ``MetricSender`` (a background thread that retries
through an outage) and ``RecordForwarding`` (each persisted checkpoint's new ``RunRecord`` entries to the run's
MLflow run), which runs where Ray's report stream arrives: Ray Train's controller or a sweep's driver."""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from pipeline.record import StoredCheckpoint, read_record
from pipeline.tracking import MAX_METRICS_PER_BATCH, TrackedRun, as_metrics


class MetricSender:
    """Sends metric batches from a background thread, in order; retries with exponential backoff while the
    store is unreachable, keeping what is unsent in memory.

    ``submit`` never blocks the caller on MLflow. ``flush(timeout_s)`` waits until everything is sent or the
    time is up, and returns what is still unsent as ``[(step, {metric: value})]``.
    """

    def __init__(self, send: Callable[[list], None], retry_base_s: float = 0.5, retry_max_s: float = 30.0,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self._send, self._retry_base_s, self._retry_max_s = send, retry_base_s, retry_max_s
        self._on_error = on_error or (lambda exc: print(f"[tracking] MLflow unreachable, will retry: {exc}",
                                                        file=sys.stderr))
        self._unsent: deque = deque()  # mlflow Metric entities, oldest first
        self._condition = threading.Condition()
        self._closed = False
        self.failures = 0
        self.failing = False  # the last send failed (the store is down)
        self._thread = threading.Thread(target=self._run, name="mlflow-metric-sender", daemon=True)
        self._thread.start()

    def submit(self, entries: list) -> None:
        """Queue ``[step, key, value, timestamp_ms]`` entries."""
        with self._condition:
            self._unsent.extend(as_metrics(entries))
            self._condition.notify_all()

    def _run(self) -> None:
        delay = self._retry_base_s
        while True:
            with self._condition:
                while not self._unsent and not self._closed:
                    self._condition.wait()
                if not self._unsent:
                    return
                batch = [self._unsent[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self._unsent)))]
            try:
                self._send(batch)
            except Exception as exc:  # an outage: keep the batch, back off, retry
                self.failures += 1
                self._on_error(exc)
                with self._condition:
                    self.failing = True
                    self._condition.notify_all()
                    if self._closed:
                        return
                    self._condition.wait(delay)
                delay = min(self._retry_max_s, delay * 2)
                continue
            delay = self._retry_base_s
            with self._condition:
                self.failing = False
                for _ in batch:
                    self._unsent.popleft()
                self._condition.notify_all()

    def flush(self, timeout_s: float = 60.0, while_failing: bool = True) -> list[tuple[int, dict[str, float]]]:
        """Wait until everything is sent, ``timeout_s`` at most; ``while_failing=False`` returns at once while
        the store is down (the sender keeps retrying)."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._unsent and (while_failing or not self.failing):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            unsent: dict[int, dict[str, float]] = {}
            for metric in self._unsent:
                unsent.setdefault(metric.step, {})[metric.key] = metric.value
            return sorted(unsent.items())

    def close(self, timeout_s: float = 60.0) -> list[tuple[int, dict[str, float]]]:
        """Flush, then stop the thread; returns what could not be sent."""
        unsent = self.flush(timeout_s)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        return unsent


class RecordForwarding:
    """Sends the new entries of each persisted checkpoint's ``RunRecord`` to its MLflow run, in the background
    (``MetricSender``: an outage is retried, never blocks). Runs where the report stream arrives: Ray Train's
    controller (``pipeline.ray_callbacks.RecordForwarder``). What it cannot send is still in the checkpoint: the
    run's owner re-sends the final record when it finishes it."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._senders: dict = {}
        self._sent_through: dict[str, int] = {}

    def __getstate__(self) -> dict:  # callbacks are pickled (to the controller, into Tune's state): no threads
        return {"tracking_uri": self.tracking_uri}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tracking_uri"])

    def forward(self, found: StoredCheckpoint) -> None:
        record = read_record(found)
        if record.run_id not in self._senders:
            run = TrackedRun(self.tracking_uri, record.run_id)
            self._senders[record.run_id] = MetricSender(run.log_batch)
        self._senders[record.run_id].submit(record.own_entries(self._sent_through.get(record.run_id, -1)))
        self._sent_through[record.run_id] = record.epoch

    def flush(self, timeout_s: float, while_failing: bool = True) -> None:
        """Wait, ``timeout_s`` at most in all, until every sender has sent what it holds (``while_failing=False``:
        not while the store is down)."""
        deadline = time.monotonic() + timeout_s
        for sender in self._senders.values():
            sender.flush(max(0.0, deadline - time.monotonic()), while_failing)
