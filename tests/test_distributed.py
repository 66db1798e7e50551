"""The gradient convention of pipeline.distributed, proven with 2 gloo processes on CPU.

Two DDP ranks, each holding half of a global batch, gather embeddings and labels, compute the loss and
back-propagate ``world_size * loss``: the parameter gradients must equal those of one process computing the
same loss over the concatenated batch.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from services import join_group, spawn_ranks

from pipeline import distributed
from pipeline.losses import SupConLoss, VarConLoss

WORLD, N_PER_RANK, D_IN, D_OUT = 2, 12, 10, 6


def make_loss(name: str):
    return VarConLoss(0.1, 0.02, num_classes=4) if name == "varcon" else SupConLoss(0.1, 0.07)


def global_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * N_PER_RANK, D_IN, generator=gen)
    labels = torch.randint(0, 4, (WORLD * N_PER_RANK,), generator=gen)
    return x, labels


def make_model():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D_OUT)


def single_process_gradient(loss_name: str) -> torch.Tensor:
    x, labels = global_batch()
    model = make_model()
    loss, _ = make_loss(loss_name)(F.normalize(model(x), dim=1), labels)
    loss.backward()
    return model.weight.grad


def _rank_main(rank: int, rendezvous: str, loss_name: str, scale_loss: bool, results) -> None:
    join_group(rank, rendezvous, WORLD)
    try:
        x, labels = global_batch()
        local = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        z = F.normalize(model(x[local]), dim=1)
        z_all = distributed.gather_with_local_grad(z)
        labels_all = distributed.gather_with_local_grad(labels[local])
        assert torch.equal(labels_all, labels)
        loss, _ = make_loss(loss_name)(z_all, labels_all)
        scale = distributed.loss_scale_for_global_batch() if scale_loss else 1
        (loss * scale).backward()
        results[rank] = model.module.weight.grad.clone()
    finally:
        dist.destroy_process_group()


def ddp_gradients(loss_name: str, scale_loss: bool) -> list[torch.Tensor]:
    results = spawn_ranks(_rank_main, loss_name, scale_loss, world=WORLD)
    return [results[r] for r in range(WORLD)]


@pytest.mark.parametrize("loss_name", ["varcon", "supcon"])
def test_two_gloo_ranks_match_one_process_on_the_global_batch(loss_name):
    expected = single_process_gradient(loss_name)
    for grad in ddp_gradients(loss_name, scale_loss=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_without_the_world_size_factor_gradients_shrink():
    """The reference code's convention: the same setup without the factor gives 1/world_size of the gradient."""
    expected = single_process_gradient("varcon")
    for grad in ddp_gradients("varcon", scale_loss=False):
        torch.testing.assert_close(grad * WORLD, expected, rtol=1e-5, atol=1e-6)


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 2)
    assert distributed.gather_with_local_grad(x) is x
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.loss_scale_for_global_batch() == 1


def _global_batch_rank(rank: int, rendezvous: str, files, results) -> None:
    from pipeline import engine
    from pipeline.config import load_config

    join_group(rank, rendezvous, WORLD)
    try:
        config = load_config(None, ["optim.global_batch_size=128", "ray.num_workers=2"])
        training = engine.build_training(config, files, torch.device("cpu"))
        view1, _, labels, index = next(iter(training.train_batches))
        same_pixels = torch.full_like(view1, 128)  # both ranks augment the same images with their own indices
        augmented = training.train_augment(same_pixels, 1, index)
        torch.testing.assert_close(training.train_augment(same_pixels, 1, index), augmented, rtol=0, atol=0)
        results[rank] = (view1.shape[0], len(training.train_batches), augmented)
    finally:
        dist.destroy_process_group()


def test_two_workers_split_the_global_batch(digits_files):
    results = spawn_ranks(_global_batch_rank, digits_files, world=WORLD)
    for rank in range(WORLD):
        local_batch, steps, _ = results[rank]
        assert local_batch * WORLD == 128  # the global batch stays what the config says
        assert steps == (1347 - digits_files.num_val) // 128  # each rank's shard gives the same number of steps
    # each rank draws its own colour augmentation (by global sample index), not the same parameters twice
    assert not torch.equal(results[0][2], results[1][2])


def _buffers_rank(rank: int, rendezvous: str, results) -> None:
    join_group(rank, rendezvous, WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT), torch.nn.BatchNorm1d(D_OUT)))
        model(torch.randn(N_PER_RANK, D_IN, generator=torch.Generator().manual_seed(rank)))  # each rank its batch
        trained = [b.clone() for b in model.module.buffers()]
        distributed.broadcast_buffers(model.module)
        results[rank] = (trained, [b.clone() for b in model.module.buffers()])
    finally:
        dist.destroy_process_group()


def test_after_a_ddp_step_ranks_hold_their_own_batchnorm_statistics_until_rank_0_s_are_broadcast():
    """DDP broadcasts rank 0's buffers at the start of a training forward; the forward then updates each rank's
    running statistics with its own batch. Evaluation and the checkpoint must see one encoder: rank 0's."""
    results = spawn_ranks(_buffers_rank, world=WORLD)
    (trained0, synced0), (trained1, synced1) = results[0], results[1]
    assert not torch.equal(trained0[0], trained1[0])  # running_mean: each rank's own batch
    for rank0, synced_0, synced_1 in zip(trained0, synced0, synced1):
        assert torch.equal(synced_0, rank0) and torch.equal(synced_1, rank0)
