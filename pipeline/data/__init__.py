"""Data layer: dataset sources, the FFCV writer (atomic, with a manifest), FFCV and torchvision loaders, and
the device-side colour augmentation.
"""
from pipeline.data.ffcv_writer import DatasetFiles, prepare_datasets, verify_beton
from pipeline.data.loaders import eval_loaders, prepare_data, train_loader
from pipeline.data.sources import DataError, load_source

__all__ = ["DataError", "DatasetFiles", "eval_loaders", "load_source", "prepare_data", "prepare_datasets",
           "train_loader", "verify_beton"]
