"""torchvision ``DataLoader`` loaders behind the same interface as the FFCV ones.

The benchmark baseline, and the fallback where FFCV cannot be installed (``data.loader=torchvision``). They read
the source directly (no ``.beton``) and yield the same uint8 views, so the engine and the device-side colour
augmentation are unchanged.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

if TYPE_CHECKING:
    from pipeline.data.sources import ImageFiles, LabelledImages


class _Views(Dataset):
    """Item i -> ``(view_1, ..., view_n, label, index)``: ``n`` draws of ``transform`` on the decoded uint8 image
    of sample ``index = indices[i]`` of ``split`` (default: every sample)."""

    def __init__(self, split: LabelledImages | ImageFiles, transform: Callable[[torch.Tensor], torch.Tensor],
                 views: int, indices: np.ndarray | None = None) -> None:
        self.split, self.transform, self.views = split, transform, views
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor | int, ...]:
        index = int(self.indices[item])
        image, label, _ = self.split[index]
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # [3, H, W] uint8
        return (*(self.transform(image) for _ in range(self.views)), label, index)


class _SeededTwoViews(Dataset):
    """Item ``(i, epoch)`` -> ``(view1, view2, label, index)``: the decode-once FFCV loader's views
    (``pipeline.data.crops``: crops and flips drawn from (seed, epoch, index, view), the same resize) of sample
    ``index = indices[i]`` decoded once."""

    def __init__(self, split: LabelledImages | ImageFiles, image_size: int, crop_scale_min: float, flip: bool,
                 seed: int, indices: np.ndarray | None = None) -> None:
        self.split, self.size, self.scale_min, self.flip, self.seed = split, image_size, crop_scale_min, flip, seed
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item_and_epoch: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        from pipeline.data import crops

        item, epoch = item_and_epoch
        index = int(self.indices[item])
        image, label, _ = self.split[index]
        image = np.ascontiguousarray(image)
        views = []
        for view in range(2):
            box = crops.crop_box(self.seed, epoch, index, view, image.shape[0], image.shape[1], self.scale_min,
                                 1.0, 3 / 4, 4 / 3)
            out = np.empty((self.size, self.size, 3), np.uint8)
            crops.resize_crop(image, *box, self.flip and crops.flips(self.seed, epoch, index, view), out)
            views.append(torch.from_numpy(out).permute(2, 0, 1))
        return views[0], views[1], label, index


class _Permutation(Sampler):
    """The items ``0..n-1`` in a random order drawn from ``seed + epoch`` (``set_epoch``), as FFCV's random order
    and ``DistributedSampler`` draw theirs: a pass's order is a function of the seed and its epoch alone."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class _WithEpoch(Sampler):
    """``base``'s items paired with the epoch the loader sets (the sampler runs in the main process); the next
    pass leaves out its first ``skip`` items (whole batches: a resume within an epoch)."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base, self.epoch, self.skip = base, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self.skip = self.skip, 0
        return ((i, self.epoch) for i in itertools.islice(self.base, skip, None))

    def __len__(self) -> int:
        return len(self.base)


class TorchvisionTwoViewLoader:
    """Iterates ``(view1, view2, labels, index)`` like ``TwoViewLoader`` (the same seeded crops, flips and
    resize), decoding in ``workers`` processes; ``DistributedSampler`` shards under DDP. Each pass's order is
    drawn from the seed and its epoch.
    """

    def __init__(self, split: LabelledImages | ImageFiles, batch_size: int, image_size: int, crop_scale_min: float,
                 flip: bool, distributed: bool, seed: int, workers: int = 1, indices: np.ndarray | None = None
                 ) -> None:
        dataset = _SeededTwoViews(split, image_size, crop_scale_min, flip, seed, indices)
        if distributed:
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = _Permutation(len(dataset), seed)
        self.with_epoch = _WithEpoch(self.sampler)
        self.batch_size, self._epoch = batch_size, 0
        # its own generator seeds the worker processes: the global RNG (which evaluation may use) plays no part
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.with_epoch, num_workers=workers,
                                 drop_last=True, persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(seed))

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value

    def skip_next(self, batches: int) -> None:
        """The next pass starts at its batch ``batches`` (a resume within an epoch)."""
        self.with_epoch.skip = batches * self.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.sampler.set_epoch(self._epoch)
        self.with_epoch.epoch = self._epoch
        self._epoch += 1
        for view1, view2, labels, index in self.loader:
            yield view1, view2, labels.long(), index.long()


class TorchvisionEvalLoader:
    """Iterates ``(images, labels, index)`` over ``indices`` in order like ``EvalLoader`` (centre crop of
    ``crop_ratio`` of the shorter side, resized; under ``distributed`` the same sharding and padding)."""

    def __init__(self, split: LabelledImages | ImageFiles, batch_size: int, image_size: int, crop_ratio: float = 1.0,
                 workers: int = 1, indices: np.ndarray | None = None, distributed: bool = False) -> None:
        transform = v2.Compose([v2.Resize(round(image_size / crop_ratio), antialias=True), v2.CenterCrop(image_size)])
        dataset = _Views(split, transform, views=1, indices=indices)
        self.num_samples = len(dataset)
        sampler = DistributedSampler(dataset, shuffle=False, drop_last=False) if distributed else None
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                                 generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, index in self.loader:
            yield images, labels.long(), index.long()
