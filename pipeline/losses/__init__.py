"""Training objectives behind one interface: ``loss_fn(z, labels) -> (loss, stats)``.

``z`` is ``[B, D]`` (every view of the global batch), ``labels`` is ``[B]`` int64. ``loss`` is a float32 scalar,
``stats`` a dict of detached scalar tensors. No loss talks to ``torch.distributed``: the engine gathers first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.losses.cross_entropy import CrossEntropyLoss
from pipeline.losses.supcon import SupConLoss
from pipeline.losses.varcon import VarConLoss

if TYPE_CHECKING:
    from pipeline.config import LossConfig

__all__ = ["VarConLoss", "SupConLoss", "CrossEntropyLoss", "build_loss"]


def build_loss(config: LossConfig, num_classes: int) -> torch.nn.Module:
    """The objective named by a ``LossConfig``."""
    if config.name == "varcon":
        return VarConLoss(config.tau1, config.eps, config.detach_target, num_classes=num_classes)
    if config.name == "supcon":
        return SupConLoss(config.supcon_temperature, config.supcon_base_temperature)
    if config.name == "cross_entropy":
        return CrossEntropyLoss()
    raise ValueError(f"unknown loss {config.name!r}: use varcon, supcon or cross_entropy")
