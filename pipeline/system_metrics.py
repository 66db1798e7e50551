"""CPU, memory, disk, network and GPU utilisation of the nodes a run trains on, in the run's MLflow System
metrics tab: MLflow's own ``SystemMetricsMonitor`` (psutil; nvidia-ml-py for GPUs), attached to the run by id,
one per node (the worker of local rank 0 runs it), logged as ``system/<node>/<metric>``.

They are a view, not part of the exactly-once record of training metrics: a tracking outage ends a node's
monitor for that attempt (MLflow's monitor stops when it cannot read the run); a worker-group restart starts new
monitors, which continue the step numbering (``resume_logging``). Samples taken while a node was down are lost.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def enabled(setting: str, use_gpu: bool) -> bool:
    """``tracking.system_metrics``: always | never | auto (GPU training only)."""
    return setting == "always" or (setting == "auto" and use_gpu)


@contextmanager
def node_monitor(run_id: str, tracking_uri: str, interval_s: float, node: str | None = None) -> Iterator[None]:
    """Sample this node every ``interval_s`` seconds into ``run_id`` while the block runs. A monitor that
    cannot start is reported, never raised: training does not depend on it."""
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=True, node_id=node or socket.gethostname(),
                                       tracking_uri=tracking_uri)
        monitor.start()
    except Exception as exc:  # noqa: BLE001
        print(f"[system metrics] not monitored on {node or socket.gethostname()}: {type(exc).__name__}: {exc}")
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
