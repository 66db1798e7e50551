"""The recipe translation of pipeline.recipes, proven with 2 gloo processes: the reference convention (its
gather keeps each rank's own gradient slice, DDP averages, the reference's lr and weight decay) and this
pipeline's (the world-size factor, translated values, ``engine.build_optimizer``) take the same SGD steps."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from services import join_group, spawn_ranks

from pipeline import distributed
from pipeline.config import REPO_ROOT, ConfigError, OptimConfig, load_config
from pipeline.engine import build_optimizer
from pipeline.losses import VarConLoss
from pipeline.recipes import REFERENCES, ReferenceRecipe, translate

WORLD, N_PER_RANK, STEPS = 2, 8, 5
REFERENCE = dict(source="test", lr=0.5, weight_decay=0.05, world_size=WORLD, per_slice_gradient=True)


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 6)).double()


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(WORLD * N_PER_RANK, 10, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (WORLD * N_PER_RANK,), generator=gen))


def reference_optimizer(model, momentum: float, decay_norm_and_bias: bool):
    """The reference's SGD, grouped as written here (not by the pipeline's code)."""
    decay = [p for p in model.parameters() if p.ndim > 1 or decay_norm_and_bias]
    rest = [p for p in model.parameters() if p.ndim <= 1 and not decay_norm_and_bias]
    return torch.optim.SGD([{"params": decay, "weight_decay": REFERENCE["weight_decay"]},
                            {"params": rest, "weight_decay": 0.0}], lr=REFERENCE["lr"], momentum=momentum)


def train(model, optimizer, rank: int, loss_factor: int) -> list[torch.Tensor]:
    loss_fn = VarConLoss(0.1, 0.02, num_classes=4)
    local = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    for step in range(STEPS):
        x, labels = batch(step)
        z = distributed.gather_with_local_grad(F.normalize(model(x[local]), dim=1))
        loss, _ = loss_fn(z.float(), labels)
        optimizer.zero_grad()
        (loss * loss_factor).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _rank_main(rank: int, rendezvous: str, results) -> None:
    join_group(rank, rendezvous, WORLD)
    try:
        for momentum in (0.0, 0.9):
            for decay_all in (False, True):
                ours = translate(ReferenceRecipe(momentum=momentum, **REFERENCE))
                config = OptimConfig(lr=ours.lr, weight_decay=ours.weight_decay, momentum=ours.momentum,
                                     decay_norm_and_bias=decay_all)
                untranslated = OptimConfig(lr=ours.lr, weight_decay=REFERENCE["weight_decay"], momentum=momentum,
                                           decay_norm_and_bias=decay_all)  # lr alone, as the configs had it
                runs = {}
                for name, factor in (("reference", 1), ("ours", WORLD), ("lr only", WORLD)):
                    model = torch.nn.parallel.DistributedDataParallel(make_model())
                    optimizer = (reference_optimizer(model, momentum, decay_all) if name == "reference" else
                                 build_optimizer(model, config if name == "ours" else untranslated))
                    runs[name] = train(model, optimizer, rank, factor)
                if rank == 0:
                    results[(momentum, decay_all)] = runs
    finally:
        dist.destroy_process_group()


def test_translated_values_take_the_reference_steps():
    results = spawn_ranks(_rank_main, world=WORLD)
    assert len(results) == 4
    for (momentum, decay_all), runs in results.items():
        initial = list(make_model().parameters())
        moved = max((a - b).abs().max().item() for a, b in zip(runs["reference"], initial))
        assert moved > 1e-3, "the steps changed the parameters"
        for reference, ours in zip(runs["reference"], runs["ours"]):
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=f"momentum={momentum} all={decay_all}")
        gap = max((a - b).abs().max().item() for a, b in zip(runs["reference"], runs["lr only"]))
        assert gap > 1e-4, "translating the learning rate alone leaves the decay W times too weak"


def test_the_rule_and_what_it_refuses():
    per_slice = translate(ReferenceRecipe("VarContrast", 0.5, 1e-4, 0.9, 8, True, warmup_start_lr=0.01))
    assert (per_slice.lr, per_slice.weight_decay, per_slice.warmup_start_lr) == pytest.approx((0.0625, 8e-4, 0.00125))
    exact = translate(ReferenceRecipe("SupContrast", 0.5, 1e-4, 0.9, 8, False, warmup_start_lr=0.01))
    assert (exact.lr, exact.weight_decay, exact.warmup_start_lr) == (0.5, 1e-4, 0.01)
    with pytest.raises(ConfigError, match="only SGD recipes translate"):
        translate(ReferenceRecipe("a LARS recipe", 4.8, 1e-6, 0.9, 32, True, optimizer="lars"))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_bundled_recipes_hold_their_references_translated(name):
    config = load_config(REPO_ROOT / "configs" / name)
    ours = translate(REFERENCES[name])
    o = config.optim
    assert (o.lr, o.weight_decay, o.momentum, o.warmup_start_lr) == pytest.approx(
        (ours.lr, ours.weight_decay, ours.momentum, ours.warmup_start_lr), rel=1e-12)
    # the references' other choices: decay on every parameter, a cosine stepped per epoch to lr x 1e-3 after a
    # 10-epoch warm-up, the Linear-ReLU-Linear head, batch 1024
    assert o.decay_norm_and_bias and o.cosine_per == "epoch" and o.min_lr_ratio == 1e-3 and o.warmup_epochs == 10
    assert not config.model.head_batchnorm and o.global_batch_size == 1024


def test_lars_recipes_are_ours():
    config = load_config(REPO_ROOT / "configs" / "imagenet1k_resnet50.yaml")
    assert config.optim.optimizer == "lars" and "imagenet1k_resnet50.yaml" not in REFERENCES
    assert "# ours" in (REPO_ROOT / "configs" / "imagenet1k_resnet50.yaml").read_text().split("optimizer: lars")[1]
