"""The temperature schedule a population-based trial actually trained with, read back from MLflow.

A PBT/PB2 trial's weights at epoch e went through its own epochs after its last exploit and, before that, through
the donor's lineage up to the exploit epoch (``varcon.exploits`` tags, written by the worker on restore). Following
those links gives ``[(epoch, tau1, eps)]`` for epochs 1..E, which ``as_piecewise`` turns into a
``loss.schedule`` that ``varcon train`` replays.
"""
from __future__ import annotations

import json

from pipeline.ray_train import EXPLOITS_TAG
from pipeline.tracking import TrackedRun

Lineage = list[tuple[int, float, float]]


def lineage_schedule(tracking_uri: str, run_id: str, until_epoch: int | None = None, depth: int = 0) -> Lineage:
    """``[(epoch, tau1, eps)]`` of the weights of ``run_id`` up to ``until_epoch`` (default: its last epoch)."""
    if depth > 1000:
        raise RuntimeError(f"exploit lineage of run {run_id} does not end: the varcon.exploits tags form a cycle")
    run = TrackedRun(tracking_uri, run_id)
    tau1, eps = dict(run.metric_history("tau1")), dict(run.metric_history("eps"))
    last = until_epoch if until_epoch is not None else max(tau1, default=0)
    exploits = [e for e in json.loads(run.tags().get(EXPLOITS_TAG, "[]")) if e["epoch"] <= last]
    prefix, start = [], 1
    if exploits:
        link = exploits[-1]
        prefix = lineage_schedule(tracking_uri, link["donor_run_id"], link["epoch"], depth + 1)
        start = link["epoch"] + 1
    return prefix + [(e, tau1[e], eps[e]) for e in range(start, last + 1) if e in tau1 and e in eps]


def as_piecewise(lineage: Lineage) -> dict:
    """A ``loss.schedule`` mapping (``kind: piecewise``) with one point per change of (tau1, eps)."""
    epochs, tau1_values, eps_values = [], [], []
    for epoch, tau1, eps in lineage:
        if not tau1_values or (tau1, eps) != (tau1_values[-1], eps_values[-1]):
            epochs.append(epoch)
            tau1_values.append(tau1)
            eps_values.append(eps)
    return {"kind": "piecewise", "epochs": epochs, "tau1_values": tau1_values, "eps_values": eps_values}
