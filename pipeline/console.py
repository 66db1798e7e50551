"""What ``varcon train`` prints while it trains: one line per epoch, made from rank 0's report as it reaches the
driver. Ray Train's controller puts each report on a queue (``pipeline.ray_callbacks.ReportSender``) that
``report_queue`` drains on the driver into the printer (``EpochPrinter``). No MLflow; Ray's queue only. A line
(wrapped here):

    epoch  3/15  loss 4.1021 (kl 0.0213, nll 4.0808)  tau2 0.0998  val_knn_top1_k20 81.43%
        2210 img/s  2.1 s  ETA 00:00:25
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.names import EPOCH, PREEMPTION_STEP

if TYPE_CHECKING:
    from ray.util.queue import Queue


def epoch_line(report: dict, total: int, monitor_key: str | None, eta_s: float | None) -> str:
    """One epoch's line: loss and its terms, mean tau2, the monitor with its split, images/s, epoch time, ETA."""
    epoch = int(report.get(EPOCH, 0))
    parts = [f"epoch {epoch:>{len(str(total))}}/{total}"]
    if "train_loss" in report:
        terms = ", ".join(f"{name} {report[f'train_{name}']:.4f}" for name in ("kl", "nll")
                          if f"train_{name}" in report)
        parts.append(f"loss {report['train_loss']:.4f}" + (f" ({terms})" if terms else ""))
    if "train_tau2_mean" in report:
        parts.append(f"tau2 {report['train_tau2_mean']:.4f}")
    if monitor_key and monitor_key in report:
        parts.append(f"{monitor_key} {report[monitor_key]:.2%}" + (" (untrained)" if epoch == 0 else ""))
    if "images_per_s" in report:
        parts.append(f"{report['images_per_s']:.0f} img/s")
    if "epoch_time_s" in report:
        parts.append(f"{report['epoch_time_s']:.1f} s")
    if eta_s is not None:
        parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(max(0.0, eta_s)))}")
    return "  ".join(parts)


class EpochPrinter:
    """Prints each reported epoch once, in order, with an ETA from the wall time of the epochs seen so far. An
    epoch reported again (a worker-group restart replays the epochs after the last checkpoint) is marked so."""

    def __init__(self, total: int, monitor_key: str | None, log: Callable[[str], None] = print) -> None:
        self.total, self.monitor_key, self.log = total, monitor_key, log
        self._printed: set[int] = set()
        self._first: tuple[int, float] | None = None  # (epoch, time) of the first trained epoch seen

    def __call__(self, report: dict) -> None:
        epoch = int(report.get(EPOCH, 0))
        if PREEMPTION_STEP in report:  # a checkpoint within the next epoch: no epoch of its own
            self.log(f"preemption notice: checkpointed within epoch {epoch + 1} after step "
                     f"{int(report[PREEMPTION_STEP])}; the run resumes there on a new node")
            return
        now = time.monotonic()
        eta = None
        if epoch >= 1:
            if self._first is None:
                self._first = (epoch, now - float(report.get("epoch_time_s", 0.0)) - float(
                    report.get("eval_time_s", 0.0)))
            done = epoch - self._first[0] + 1
            eta = (now - self._first[1]) / done * (self.total - epoch)
        line = epoch_line(report, self.total, self.monitor_key, eta)
        if epoch in self._printed:
            line += "  (again: replayed after a restart from the last checkpoint)"
        self._printed.add(epoch)
        self.log(line)


def queue_on_this_node(maxsize: int) -> Queue:
    """A Ray queue (an actor with no CPU) on this process's node: one placed on a spot node would die with it and
    lose what the run reports through it for the rest of the run."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(maxsize=maxsize, actor_options={"num_cpus": 0, "scheduling_strategy": here})


@contextmanager
def report_queue(on_report: Callable[[dict], None]) -> Iterator:
    """A Ray queue on this process's node (``queue_on_this_node``) whose items reach ``on_report`` on this process,
    in order, drained by a thread until the block ends; pass it to ``ray_train.run_training(console_queue=...)``."""
    from ray.util.queue import Empty

    queue = queue_on_this_node(10_000)
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                on_report(queue.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue actor is gone (Ray shut down): nothing more will come
                return

    thread = threading.Thread(target=pump, name="varcon-console", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=30)
        queue.shutdown()
