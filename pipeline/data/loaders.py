"""Loader factory: the FFCV loaders (default) or their torchvision twins (``data.loader=torchvision``)."""
from __future__ import annotations

from pipeline.data.ffcv_loader import EvalLoader, TwoViewLoader
from pipeline.data.prepare import PreparedDataset
from pipeline.data.sources import load_source
from pipeline.data.torchvision_loader import TorchvisionEvalLoader, TorchvisionTwoViewLoader


def train_loader(config, files: PreparedDataset, batch_size: int, distributed: bool):
    """Two-view training batches of ``batch_size`` images for this worker."""
    d = config.data
    args = dict(batch_size=batch_size, image_size=d.image_size, crop_scale_min=d.crop_scale_min,
                flip=d.horizontal_flip, distributed=distributed, seed=config.seed)
    if d.loader == "ffcv":
        return TwoViewLoader(files.train, threads=d.loader_threads, **args)
    return TorchvisionTwoViewLoader(load_source(d, log=lambda *_: None)["train"], workers=d.loader_threads, **args)


def eval_loaders(config, files: PreparedDataset, batch_size: int) -> dict:
    """``{"train": ..., "test": ...}`` loaders of single centre views, every sample once, in order."""
    d = config.data
    if d.loader == "ffcv":
        return {split: EvalLoader(getattr(files, split), batch_size, d.image_size, d.eval_crop_ratio,
                                  d.loader_threads) for split in ("train", "test")}
    splits = load_source(d, log=lambda *_: None)
    return {split: TorchvisionEvalLoader(splits[split], batch_size, d.image_size, d.eval_crop_ratio,
                                         d.loader_threads) for split in ("train", "test")}

