"""Loader factory: the FFCV loaders (default) or their torchvision twins (``data.loader=torchvision``)."""
from __future__ import annotations

from pipeline.data.ffcv_writer import DatasetFiles
from pipeline.data.sources import channel_stats, load_source


def train_loader(config, files: DatasetFiles, batch_size: int, distributed: bool):
    """Two-view training batches of ``batch_size`` images for this worker."""
    d = config.data
    args = dict(batch_size=batch_size, image_size=d.image_size, crop_scale_min=d.crop_scale_min,
                flip=d.horizontal_flip, distributed=distributed, seed=config.seed)
    if d.loader == "ffcv":
        from pipeline.data.ffcv_loader import TwoViewLoader

        return TwoViewLoader(files.train, threads=d.loader_threads, **args)
    from pipeline.data.torchvision_loader import TorchvisionTwoViewLoader

    return TorchvisionTwoViewLoader(load_source(d, log=lambda *_: None)["train"], workers=d.loader_threads, **args)


def eval_loaders(config, files: DatasetFiles, batch_size: int) -> dict:
    """``{"train": ..., "test": ...}`` loaders of single centre views, every sample once, in order."""
    d = config.data
    if d.loader == "ffcv":
        from pipeline.data.ffcv_loader import EvalLoader

        return {split: EvalLoader(getattr(files, split), batch_size, d.image_size, d.eval_crop_ratio,
                                  d.loader_threads) for split in ("train", "test")}
    from pipeline.data.torchvision_loader import TorchvisionEvalLoader

    splits = load_source(d, log=lambda *_: None)
    return {split: TorchvisionEvalLoader(splits[split], batch_size, d.image_size, d.eval_crop_ratio,
                                         d.loader_threads) for split in ("train", "test")}


def prepare_data(data_config, cache_root, log=print, repair: bool = False) -> DatasetFiles:
    """For the FFCV loader: write (or reuse) and verify the ``.beton`` files (``repair`` rewrites damaged ones).
    For the torchvision loader: describe the source as it is (nothing written).
    """
    if data_config.loader == "ffcv":
        from pipeline.data.ffcv_writer import prepare_datasets

        return prepare_datasets(data_config, cache_root, log, repair)
    splits = load_source(data_config, log)
    mean, std = channel_stats(splits["train"])
    return DatasetFiles(train="", test="", num_classes=len(splits["train"].class_names),
                        num_train=len(splits["train"]), num_test=len(splits["test"]),
                        channel_mean=tuple(mean), channel_std=tuple(std))
