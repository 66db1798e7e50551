"""Loader factory: the FFCV loaders (default) or their torchvision twins (``data.loader=torchvision``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.ffcv_loader import EvalLoader, TwoViewLoader
from pipeline.data.prepare import PreparedDataset
from pipeline.data.sources import load_source
from pipeline.data.splits import SplitIndices
from pipeline.data.torchvision_loader import TorchvisionEvalLoader, TorchvisionTwoViewLoader

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig


def train_loader(config: ExperimentConfig, files: PreparedDataset, batch_size: int, distributed: bool,
                 split: SplitIndices) -> TwoViewLoader | TorchvisionTwoViewLoader:
    """Two-view training batches of ``batch_size`` images for this worker, from the training split's ``bank``
    indices (the validation samples are never trained on)."""
    d = config.data
    args = dict(batch_size=batch_size, image_size=d.image_size, crop_scale_min=d.crop_scale_min,
                flip=d.horizontal_flip, distributed=distributed, seed=config.seed, indices=split.bank)
    if d.loader == "ffcv":
        return TwoViewLoader(files.train, threads=d.loader_threads, decode_once=d.ffcv_views == "decode_once", **args)
    return TorchvisionTwoViewLoader(load_source(d, log=lambda *_: None)["train"], workers=d.loader_threads, **args)


def eval_loaders(config: ExperimentConfig, files: PreparedDataset, batch_size: int, distributed: bool,
                 indices: dict[str, np.ndarray | None]) -> dict[str, EvalLoader | TorchvisionEvalLoader]:
    """``{name: loader}`` of single centre views for each ``name`` in ``indices``: ``bank`` and ``val`` read the
    training file at their indices, ``test`` the test file (``None``: every sample); each sample once, in order,
    sharded over the ranks under ``distributed``."""
    d = config.data
    file_of = {"bank": "train", "val": "train", "test": "test"}
    if d.loader == "ffcv":
        return {name: EvalLoader(getattr(files, file_of[name]), batch_size, d.image_size, d.eval_crop_ratio,
                                 d.loader_threads, chosen, distributed) for name, chosen in indices.items()}
    splits = load_source(d, log=lambda *_: None)
    return {name: TorchvisionEvalLoader(splits[file_of[name]], batch_size, d.image_size, d.eval_crop_ratio,
                                        d.loader_threads, chosen, distributed) for name, chosen in indices.items()}
