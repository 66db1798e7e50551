"""Data layer, in the order data flows: sources (``sources``), the FFCV writer (``ffcv_writer``), manifests
(``manifest``), preparation of a config's dataset (``prepare``); then the FFCV and torchvision loaders
(``loaders``), the host-to-device copy (``transfer``) and the device-side colour augmentation (``augment``).
"""
from pipeline.data.manifest import verify_beton
from pipeline.data.prepare import PreparedDataset, dataset_folder, dataset_key, prepare_dataset
from pipeline.data.sources import DataError, load_source

__all__ = ["DataError", "PreparedDataset", "dataset_folder", "dataset_key", "load_source", "prepare_dataset",
           "verify_beton"]
