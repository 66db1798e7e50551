"""Host-to-device copies that never make the host wait: the one way a loader's tensor reaches the training device.

A copy from pageable host memory to a GPU is synchronous (the host waits until the bytes have left). ``to_device``
stages the tensor in page-locked memory from PyTorch's caching host allocator, which keeps the block until the
asynchronous copy has finished (the loader may refill its own buffer at once), and enqueues the copy with
``non_blocking=True`` on the current stream. A tensor already on ``device`` is returned as it is; a copy to the
host blocks (a non-blocking device-to-host copy could be read before it lands).
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without a host wait: a pinned staging copy, then a non-blocking copy; any dtype
    and shape (images, labels, sample indices). The staging copy is made even from pinned memory: the caller's
    buffer may be refilled as soon as this returns, the allocator's block is not."""
    if tensor.device == device:
        return tensor
    if device.type == "cpu":  # to the host: a blocking copy, so the values are there when it returns
        return tensor.to(device)
    if tensor.device.type != "cpu":
        return tensor.to(device, non_blocking=True)
    staged = torch.empty_like(tensor, pin_memory=True)
    staged.copy_(tensor)
    return staged.to(device, non_blocking=True)
