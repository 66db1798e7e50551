"""The temperature schedule a population-based trial's weights actually trained with.

A PBT/PB2 trial's final ``RunRecord`` holds the per-epoch ``tau1`` and ``eps`` of its weights' whole lineage: its
own epochs after its last exploit and, before that, the donor's (inherited with the checkpoint, recursively).
``lineage_schedule`` reads ``[(epoch, tau1, eps)]`` for epochs 1..E from it, and ``as_piecewise`` turns that into
a ``loss.schedule`` that ``varcon train`` replays.
"""
from __future__ import annotations

from pipeline.record import RunRecord

Lineage = list[tuple[int, float, float]]


def lineage_schedule(record: RunRecord) -> Lineage:
    """``[(epoch, tau1, eps)]`` of the weights of ``record``, for every trained epoch."""
    history = record.history()
    tau1, eps = dict(history.get("tau1", [])), dict(history.get("eps", []))
    return [(epoch, tau1[epoch], eps[epoch]) for epoch in sorted(tau1) if epoch in eps and epoch >= 1]


def as_piecewise(lineage: Lineage) -> dict:
    """A ``loss.schedule`` mapping (``kind: piecewise``) with one point per change of (tau1, eps)."""
    epochs, tau1_values, eps_values = [], [], []
    for epoch, tau1, eps in lineage:
        if not tau1_values or (tau1, eps) != (tau1_values[-1], eps_values[-1]):
            epochs.append(epoch)
            tau1_values.append(tau1)
            eps_values.append(eps)
    return {"kind": "piecewise", "epochs": epochs, "tau1_values": tau1_values, "eps_values": eps_values}
