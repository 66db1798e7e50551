"""The evaluation splits: a seeded, stratified validation share carved from the training split, by sample index.

The training split's files are written once; ``data.val_fraction`` picks a set of their indices for validation
(per class ``ceil(val_fraction * n_c)`` samples, drawn with ``data.val_seed``: every class is validated), so
changing it rewrites nothing. Training, the kNN memory bank and the probes' training set use the rest
(``bank``); everything that selects (the monitor, the best checkpoint, a sweep's scheduler and best trial)
reads ``val``; ``test`` is the dataset's own test split, evaluated at the end. ``write_validation_manifest``
records the choice beside the files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, DataConfig


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the training split's file: ``bank`` (trained on, the kNN memory bank) and ``val``, both
    sorted, disjoint, covering it."""

    bank: np.ndarray
    val: np.ndarray

    def digest(self) -> str:
        """Names the validation indices (``PreparedDataset.val_digest``); "" when there are none."""
        if not len(self.val):
            return ""
        return hashlib.sha256(self.val.astype(np.int64).tobytes()).hexdigest()[:16]


def validation_split(labels: np.ndarray, fraction: float, seed: int, class_names: list[str] | None = None
                     ) -> SplitIndices:
    """Per class c with n_c samples, ``ceil(fraction * n_c)`` of them (a seeded permutation's first) go to
    validation. Refuses a split that would leave a class no training sample."""
    labels = np.asarray(labels)
    if fraction == 0:
        return SplitIndices(np.arange(len(labels)), np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = math.ceil(fraction * len(members))
        if take >= len(members):
            name = class_names[label] if class_names else str(label)
            raise ConfigError(f"data.val_fraction={fraction} leaves class {name!r} ({len(members)} training "
                              f"sample{'s' if len(members) > 1 else ''}) none to train on: add images to the class "
                              f"or set data.val_fraction=0")
        val.append(rng.permutation(members)[:take])
    val_indices = np.sort(np.concatenate(val)).astype(np.int64)
    bank = np.setdiff1d(np.arange(len(labels)), val_indices).astype(np.int64)
    return SplitIndices(bank, val_indices)


@lru_cache(maxsize=8)
def beton_labels(path: str) -> np.ndarray:
    """The label column of an FFCV file (its metadata; no image is decoded)."""
    from ffcv.reader import Reader

    reader = Reader(path)
    return np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)


def split_indices(data_config: DataConfig, train_labels: np.ndarray, class_names: list[str] | None = None
                  ) -> SplitIndices:
    return validation_split(train_labels, data_config.val_fraction, data_config.val_seed, class_names)


def write_validation_manifest(folder: Path, data_config: DataConfig, split: SplitIndices, labels: np.ndarray
                              ) -> Path:
    """``<folder>/validation-<fraction>-<seed>.json``: the fraction, seed, sizes, per-class counts and the
    digest of the validation indices (written atomically; the same choice writes the same bytes)."""
    d = data_config
    path = folder / f"validation-{d.val_fraction:g}-{d.val_seed}.json"
    counts = np.bincount(labels[split.val], minlength=int(labels.max()) + 1) if len(split.val) else []
    body = json.dumps({"val_fraction": d.val_fraction, "val_seed": d.val_seed, "num_val": int(len(split.val)),
                       "num_bank": int(len(split.bank)), "val_per_class": [int(c) for c in counts],
                       "val_indices_sha256_16": split.digest()}, indent=2)
    if not path.is_file() or path.read_text() != body:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, path)
    return path
