"""torchvision ``DataLoader`` loaders behind the same interface as the FFCV ones.

The benchmark baseline, and the fallback where FFCV cannot be installed (``data.loader=torchvision``). They read
the source directly (no ``.beton``) and yield the same uint8 views, so the engine and the device-side colour
augmentation are unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision.transforms import v2


class _Views(Dataset):
    """Sample i -> ``(view_1, ..., view_n, label[, i])``: ``n`` draws of ``transform`` on one decoded uint8
    image, and with ``with_index`` the sample's index."""

    def __init__(self, split, transform, views: int, with_index: bool = False) -> None:
        self.split, self.transform, self.views, self.with_index = split, transform, views, with_index

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image, label, _ = self.split[index]
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # [3, H, W] uint8
        return (*(self.transform(image) for _ in range(self.views)), label, *((index,) if self.with_index else ()))


class TorchvisionTwoViewLoader:
    """Iterates ``(view1, view2, labels, index)`` like ``TwoViewLoader``, decoding and cropping in ``workers``
    processes; ``DistributedSampler`` shards under DDP.
    """

    def __init__(self, split, batch_size: int, image_size: int, crop_scale_min: float, flip: bool,
                 distributed: bool, seed: int, workers: int = 1) -> None:
        ops = [v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True)]
        if flip:
            ops.append(v2.RandomHorizontalFlip())
        dataset = _Views(split, v2.Compose(ops), views=2, with_index=True)
        if distributed:
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        self._epoch = 0
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=True, persistent_workers=workers > 0)

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self._epoch)
        self._epoch += 1
        for view1, view2, labels, index in self.loader:
            yield view1, view2, labels.long(), index.long()


class TorchvisionEvalLoader:
    """Iterates ``(images, labels)`` in order: centre crop of ``crop_ratio`` of the shorter side, resized."""

    def __init__(self, split, batch_size: int, image_size: int, crop_ratio: float = 1.0, workers: int = 1):
        transform = v2.Compose([v2.Resize(round(image_size / crop_ratio), antialias=True), v2.CenterCrop(image_size)])
        self.loader = DataLoader(_Views(split, transform, views=1), batch_size=batch_size, shuffle=False,
                                 num_workers=workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images, labels.long()
