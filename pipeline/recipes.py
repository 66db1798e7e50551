"""Reference recipes in this pipeline's convention: the one place the translation is defined.

This pipeline back-propagates the exact gradient ``g`` of the loss over the global batch, for any worker count
(``pipeline.distributed``). Reference code whose all-gather keeps only each rank's own slice of the gradient while
DDP averages over ``W`` ranks (VarContrast) steps with ``g / W`` instead, so plain SGD there does

    w <- w - lr_ref * (g / W + wd_ref * w)

and the same update here needs ``lr = lr_ref / W`` and ``wd = wd_ref * W``: ``lr * (g + wd * w)`` is the line
above. SGD with momentum (``b <- mu * b + (g + wd * w)``, ``w <- w - lr * b``) is linear in ``(g, w)``, so the
rule holds with momentum too (the buffer is ``W`` times the reference's, the step the same). Every other value
stated in absolute learning-rate units (a warm-up start) scales like ``lr``. Reference code that computes one
loss over the whole batch (SupContrast under DataParallel) already has the exact gradient: its values carry over
as they are. LARS is refused: its trust ratio ``||w|| / ||g + wd * w||`` is not linear in the gradient's scale
(and timm's LARS skips adaptation where a group has no decay), so no translated values give the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError


@dataclass(frozen=True)
class ReferenceRecipe:
    """Optimiser values as a reference implementation states them."""

    source: str  # where the values come from (paper, file of the reference code)
    lr: float
    weight_decay: float
    momentum: float
    world_size: int  # ranks the reference ran on
    per_slice_gradient: bool  # the reference's gradient is the global loss's over world_size (see above)
    warmup_start_lr: float = 0.0  # absolute learning rate the warm-up starts from
    optimizer: str = "sgd"


@dataclass(frozen=True)
class Translated:
    """The same updates in this pipeline's convention."""

    lr: float
    weight_decay: float
    momentum: float
    warmup_start_lr: float


def translate(reference: ReferenceRecipe) -> Translated:
    """This pipeline's values for ``reference`` (the rule in the module docstring)."""
    if reference.optimizer != "sgd":
        raise ConfigError(f"{reference.source}: only SGD recipes translate between gradient conventions "
                          f"({reference.optimizer}'s update is not linear in the gradient's scale): state this "
                          f"pipeline's values directly and mark them as ours")
    factor = reference.world_size if reference.per_slice_gradient else 1
    return Translated(lr=reference.lr / factor, weight_decay=reference.weight_decay * factor,
                      momentum=reference.momentum, warmup_start_lr=reference.warmup_start_lr / factor)


# The optimiser recipe behind each bundled config that follows a reference; the configs hold the translated
# values and tests/test_recipes.py checks that they agree. Configs not listed state their own values ("ours").
REFERENCES = {
    "cifar100_resnet50.yaml": ReferenceRecipe(
        "VarContrast, CIFAR-100 (VARCON.md): 8 GPUs, gather keeping the local gradient", lr=0.5, weight_decay=1e-4,
        momentum=0.9, world_size=8, per_slice_gradient=True, warmup_start_lr=0.01),
    "cifar100_resnet50_supcon.yaml": ReferenceRecipe(
        "SupContrast main_supcon.py, batch 1024, DataParallel", lr=0.5, weight_decay=1e-4, momentum=0.9,
        world_size=8, per_slice_gradient=False, warmup_start_lr=0.01),
    "cifar100_resnet50_ce.yaml": ReferenceRecipe(
        "SupContrast main_ce.py, batch 1024, DataParallel", lr=0.8, weight_decay=1e-4, momentum=0.9,
        world_size=8, per_slice_gradient=False, warmup_start_lr=0.01),
}
