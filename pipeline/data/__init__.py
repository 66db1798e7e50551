"""Data layer: dataset sources, the FFCV writer (atomic, with a manifest) and the two-view FFCV loaders."""
from pipeline.data.sources import LabelledImages, load_source
from pipeline.data.ffcv_writer import DatasetFiles, prepare_datasets

__all__ = ["LabelledImages", "load_source", "DatasetFiles", "prepare_datasets"]
