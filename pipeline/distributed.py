"""Cross-worker helpers on ``torch.distributed`` (any backend; gloo on CPU). No Ray here.

Gradient convention (the one place it is defined):
    Every rank gathers the embeddings of the whole global batch, computes the same global loss L on them,
    and back-propagates ``world_size * L`` through its *local* slice only (``gather_with_local_grad``).
    DDP then averages parameter gradients over ranks, so each parameter receives
        (1/W) * sum_r W * dL/dz_r * dz_r/dtheta = dL/dtheta,
    exactly the gradient of one process computing L over the concatenated global batch. The learning rate
    in the config therefore means the same thing for any worker count. (The reference code omits the factor
    W, which shrinks gradients by the world size.) ``loss_scale_for_global_batch()`` returns W.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` on each of W ranks -> ``[W*n, ...]`` in rank order; gradient flows to this rank's slice only.

    Every rank must pass the same ``n`` (the loaders drop the last incomplete batch).
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def loss_scale_for_global_batch() -> int:
    """Factor applied to the loss before backward so DDP's averaging yields the global-loss gradient."""
    return world_size()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank's buffers (BatchNorm's running statistics) replaced by rank ``src``'s, in place.

    DDP broadcasts buffers from rank 0 at the start of each training forward, so after a step every rank holds its
    own batch's update: evaluated as they are, the W ranks would extract features with W slightly different
    encoders, none of them exactly the one rank 0 checkpoints."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (in place; returned)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(n, dtype=torch.int64, device=device))
    return [int(s) for s in sizes]


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all) concatenated along ``dim`` in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def all_to_all(tensor: torch.Tensor) -> torch.Tensor:
    """``[world, ...]``: slice r of this rank's ``tensor`` goes to rank r; slice r of the result came from rank r."""
    if not is_distributed():
        return tensor
    received = torch.empty_like(tensor)
    dist.all_to_all_single(received, tensor.contiguous())
    return received


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` ``[n_r, ...]`` (``n_r`` may differ) concatenated along dim 0 in rank order."""
    if not is_distributed():
        return tensor
    sizes = all_sizes(tensor.shape[0], tensor.device)
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
