"""FFCV loaders: two randomly cropped (and flipped) views per image for training, one centre view for evaluation.

Both yield uint8 images ``[n, 3, S, S]``; colour augmentation and normalisation run batched on the training
device afterwards (``pipeline.data.augment``). Under DDP (``distributed=True``) each rank reads a disjoint shard
in a random order seeded by ``seed + epoch``, like PyTorch's ``DistributedSampler``. Each loader checks its file
against the manifest (size, sample count) when it opens it.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.ffcv_two_view import two_view_decoder
from pipeline.data.manifest import verify_beton


def _crop_view(image_size: int, crop_scale_min: float, flip: bool) -> list:
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    ops = [RandomResizedCropRGBImageDecoder((image_size, image_size), scale=(crop_scale_min, 1.0))]
    if flip:
        ops.append(RandomHorizontalFlip())
    return ops + [ToTensor(), ToTorchImage()]


def _int_pipeline() -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


class TwoViewLoader:
    """Iterates ``(view1, view2, labels, index)``: uint8 ``[n, 3, S, S]`` twice, int64 labels ``[n]`` and the
    int64 global sample indices ``[n]`` (the device-side augmentation draws by them), n = batch_size. Reuse one
    instance across epochs: FFCV compiles its pipeline on first use.

    ``decode_once`` (default): one pipeline decodes each image once and renders both views with crops and flips
    drawn from (seed, epoch, sample index, view) (``pipeline.data.ffcv_two_view``); otherwise two FFCV pipelines
    on the field, each decoding the image and drawing its crop from FFCV's unseeded generator.
    """

    def __init__(self, path: str, batch_size: int, image_size: int, crop_scale_min: float, flip: bool,
                 distributed: bool, seed: int, threads: int = 1, indices=None, decode_once: bool = True) -> None:
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        verify_beton(path, check_hash="never")
        self.decode_once = decode_once
        self.epoch_cell = np.zeros(1, np.int64)  # read by the compiled decoder at run time
        if decode_once:
            decoder = two_view_decoder(image_size, (crop_scale_min, 1.0), (3 / 4, 4 / 3), flip, seed,
                                       self.epoch_cell)
            pipelines = {"image": PipelineSpec("image", decoder=decoder, transforms=[ToTensor()]),
                         "label": _int_pipeline(), "index": _int_pipeline()}
        else:
            pipelines = {
                "image": _crop_view(image_size, crop_scale_min, flip),
                "label": _int_pipeline(),
                "index": _int_pipeline(),
                "image_view2": PipelineSpec("image", transforms=_crop_view(image_size, crop_scale_min, flip)),
            }
        self.loader = Loader(path, batch_size=batch_size, num_workers=threads, order=OrderOption.RANDOM,
                             distributed=distributed, seed=seed, drop_last=True, pipelines=pipelines,
                             indices=indices)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration uses (FFCV counts passes)."""
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = value

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if not self.decode_once:
            for view1, labels, index, view2 in self.loader:
                yield view1, view2, labels.long(), index.long()
            return
        self.epoch_cell[0] = self.loader.next_epoch  # the pass about to start draws its crops with this epoch
        for views, labels, index in self.loader:  # views: [n, 2, S, S, 3] -> two [n, 3, S, S] (channels-last)
            yield views[:, 0].permute(0, 3, 1, 2), views[:, 1].permute(0, 3, 1, 2), labels.long(), index.long()


class EvalLoader:
    """Iterates ``(images, labels, index)`` over ``indices`` (default: all) in file order: a centre crop of
    ``crop_ratio`` of the shorter side, resized to ``image_size``. With ``distributed`` each rank reads every
    ``world``-th sample; the last ranks' final samples repeat the first ones (``DistributedSampler`` padding):
    ``num_samples`` is the count without repeats.
    """

    def __init__(self, path: str, batch_size: int, image_size: int, crop_ratio: float = 1.0,
                 threads: int = 1, indices=None, distributed: bool = False) -> None:
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor, ToTorchImage

        verify_beton(path, check_hash="never")
        pipelines = {"image": [CenterCropRGBImageDecoder((image_size, image_size), crop_ratio), ToTensor(),
                               ToTorchImage()], "label": _int_pipeline(), "index": _int_pipeline()}
        self.loader = Loader(path, batch_size=batch_size, num_workers=threads, order=OrderOption.SEQUENTIAL,
                             distributed=distributed, drop_last=False, pipelines=pipelines, indices=indices)
        self.num_samples = len(self.loader.indices)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # FFCV refills a ring of batch buffers: labels and indices are kept across batches (feature extraction
        # concatenates them), so they are copied; images are consumed before the buffer comes round again
        for images, labels, index in self.loader:
            yield images, labels.long().clone(), index.long().clone()
