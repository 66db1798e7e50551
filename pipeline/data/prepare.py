"""Data preparation: from a ``DataConfig`` to the files (or the source description) the loaders read.

For the FFCV loader the train and test splits are written to ``<cache_root>/<dataset>-<key>/``, where the key
is a digest of the settings that change the stored bytes (``stored_settings``): two configs that store the same
data share the files, two that store different data never overwrite each other. Writers of one folder exclude
each other with a file lock; a folder already written with the same settings from the same source is reused
after it is verified against its manifests. The torchvision loader reads the source directly: nothing is
written. The validation split is a set of the training split's indices (``pipeline.data.splits``), recorded in
``validation-<fraction>-<seed>.json`` beside the files.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data import manifest as manifests
from pipeline.data.ffcv_writer import write_beton
from pipeline.data.source_identity import SourceIdentity, source_fingerprints, source_identity
from pipeline.data.sources import DataError, channel_stats, load_source
from pipeline.data.splits import SplitIndices, beton_labels, split_indices, write_validation_manifest

if TYPE_CHECKING:
    from pipeline.config import DataConfig

SPLITS = ("train", "test")


@dataclass(frozen=True)
class PreparedDataset:
    """What the loaders and the model need to know about a prepared dataset: the ``.beton`` paths (empty for
    the torchvision loader, which reads the source itself), sizes, classes and the train split's channel
    statistics in [0, 1]. ``num_train`` counts the training file; ``num_val`` of its samples are the validation
    split (``val_digest`` identifies which), the rest train and form the kNN bank."""

    train: str
    test: str
    num_classes: int
    num_train: int
    num_test: int
    channel_mean: tuple[float, float, float]
    channel_std: tuple[float, float, float]
    num_val: int = 0
    val_digest: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> PreparedDataset:
        return cls(**{**raw, "channel_mean": tuple(raw["channel_mean"]), "channel_std": tuple(raw["channel_std"])})


def max_resolution(d: DataConfig) -> int:
    """Longest stored side: ``data.max_resolution``, else the training size."""
    return d.max_resolution or d.image_size


def stored_settings(d: DataConfig) -> dict:
    """The settings of a ``DataConfig`` that change the stored bytes, and only those: the training crop size
    counts only through ``max_resolution`` (and for generated sources, whose images it sizes); JPEG settings
    only where JPEG is written."""
    settings = {"dataset": d.dataset, "root": str(Path(d.root).expanduser().resolve()) if d.root else "",
                "write_mode": d.write_mode, "max_resolution": max_resolution(d)}
    if d.write_mode != "raw":
        settings["jpeg_quality"] = d.jpeg_quality
    if d.write_mode == "proportion":
        settings["compress_probability"] = d.compress_probability
    if d.dataset == "digits":
        settings.update(image_size=d.image_size, test_fraction=d.test_fraction, split_seed=d.split_seed)
    if d.dataset == "synthetic":
        settings.update(image_size=d.image_size, num_classes=d.num_classes, train_samples=d.train_samples,
                        test_samples=d.test_samples, split_seed=d.split_seed)
    if d.dataset == "imagefolder":
        settings.update(on_bad_image=d.on_bad_image)
    return settings


def dataset_key(d: DataConfig) -> str:
    """``<dataset>-<digest of stored_settings>``: the cache folder's name, and what a sweep's driver and its
    trials compare to share one preparation."""
    digest = hashlib.sha256(json.dumps(stored_settings(d), sort_keys=True).encode()).hexdigest()[:10]
    return f"{d.dataset}-{digest}" if d.loader == "ffcv" else f"{d.dataset}-{digest}-source"


def dataset_folder(d: DataConfig, cache_root: str | Path) -> Path:
    return Path(cache_root) / dataset_key(d)


def prepare_dataset(d: DataConfig, cache_root: str | Path, log: Callable[[str], None] = print, repair: bool = False,
                    check_split: Callable[[SplitIndices], None] | None = None) -> PreparedDataset:
    """The prepared dataset of ``DataConfig`` ``d``. FFCV: write the splits unless files written with the same
    settings from the same source are there, then verify both against their manifests; a file that fails is
    rewritten with ``repair`` (``varcon prepare``), else refused with a ``DataError`` (``varcon train``: a
    damaged file is reported, never silently replaced). Torchvision: describe the source as it is.
    ``check_split`` (e.g. that the batches fit the training samples) sees the split before anything is
    written, and may raise."""
    check_split = check_split or (lambda _: None)
    if d.loader != "ffcv":
        splits = load_source(d, log)
        mean, std = channel_stats(splits["train"])
        val = split_indices(d, splits["train"].labels, splits["train"].class_names)
        check_split(val)
        return PreparedDataset("", "", len(splits["train"].class_names), len(splits["train"]), len(splits["test"]),
                               tuple(mean), tuple(std), len(val.val), val.digest())
    settings = stored_settings(d)
    folder = dataset_folder(d, cache_root)
    paths = {split: folder / f"{split}.beton" for split in SPLITS}
    identity = _identity(d, paths["train"], log)
    if not all(manifests.is_current(path, settings, identity) for path in paths.values()):
        _write_splits(d, paths, settings, identity, log, only_if_stale=True, check_split=check_split)
    try:
        found = {split: manifests.verify_beton(path, d.verify_hash) for split, path in paths.items()}
    except DataError as exc:
        if not repair:
            raise
        log(f"{exc}: rewriting")
        _write_splits(d, paths, settings, identity, log, only_if_stale=False, check_split=check_split)
        found = {split: manifests.verify_beton(path, d.verify_hash) for split, path in paths.items()}
    train, test = found["train"], found["test"]
    if train["class_names"] != test["class_names"]:
        raise DataError(f"the train and test splits of {d.dataset} list different classes: fix the source so "
                        f"both use the same class set")
    labels = beton_labels(str(paths["train"]))
    val = split_indices(d, labels, train["class_names"])
    check_split(val)
    if len(val.val):
        write_validation_manifest(folder, d, val, labels)
    return PreparedDataset(str(paths["train"]), str(paths["test"]), train["num_classes"], train["num_samples"],
                           test["num_samples"], tuple(train["channel_mean"]), tuple(train["channel_std"]),
                           len(val.val), val.digest())


def prepared_split(d: DataConfig, cache_root: str | Path) -> tuple[SplitIndices, list[str]] | None:
    """The split and class names of an FFCV dataset already prepared with the current settings, read from its
    manifest and labels only (nothing written, no source decoded), after the file's integrity check
    (``DataError``); None when it is not prepared yet."""
    if d.loader != "ffcv":
        return None
    train = dataset_folder(d, cache_root) / "train.beton"
    if not manifests.is_current(train, stored_settings(d), source_identity(d, manifests.manifest_if_any(train))):
        return None
    # an altered file is refused here, before its labels are trusted (hashing at most 1 GiB: prepare hashes
    # larger ones again if data.verify_hash=always)
    names = manifests.verify_beton(train, "never" if d.verify_hash == "never" else "auto")["class_names"]
    return split_indices(d, beton_labels(str(train)), names), names


def dataset_splits(d: DataConfig, files: PreparedDataset) -> SplitIndices:
    """The bank and validation indices of ``files`` (prepared from ``DataConfig`` ``d``), as ``prepare_dataset``
    chose them; what a worker calls."""
    if files.train:
        labels = beton_labels(files.train)
    else:
        labels = load_source(d, log=lambda *_: None)["train"].labels
    split = split_indices(d, labels)
    if split.digest() != files.val_digest:
        raise DataError(f"the validation split of {files.train or d.dataset} differs from the one prepared: "
                        f"run `varcon prepare` again")
    return split


def _identity(d: DataConfig, train: Path, log: Callable[[str], None]) -> SourceIdentity:
    """The source identity this start compares; under ``manifest``, one line saying what is trusted, and a
    ``DataError`` where nothing was prepared to trust."""
    identity = source_identity(d, manifests.manifest_if_any(train))
    if identity.mode != "manifest":
        return identity
    if not train.is_file():
        if d.source_check == "auto":  # nothing prepared to trust: the source itself must be read (and is refused)
            return SourceIdentity("walk", "")
        raise DataError(f"data.source_check=manifest and no prepared files under {train.parent}: run `varcon "
                        f"prepare` where data.root={d.root} is (a CPU job on the cluster), with the same config")
    hashed = {"always": "sha256 checked", "never": "no sha256"}.get(d.verify_hash, "sha256 up to 1 GiB")
    log(f"data.source_check=manifest{' (data.root is not visible here)' if d.source_check == 'auto' else ''}: the "
        f"source is not read; the prepared files are trusted as `varcon prepare` recorded it, after their size "
        f"and header check ({hashed}, data.verify_hash={d.verify_hash})")
    return identity


def _write_splits(d: DataConfig, paths: dict[str, Path], settings: dict, identity: SourceIdentity,
                  log: Callable[[str], None], only_if_stale: bool, check_split: Callable[[SplitIndices], None]) -> None:
    """Read the source, then write every split under the folder's lock (another process may have written them
    meanwhile: with ``only_if_stale`` they are then left as they are, as ``identity`` compares them)."""
    from filelock import FileLock

    if identity.mode == "manifest":
        raise DataError(f"the prepared files under {paths['train'].parent} are not current and "
                        f"data.source_check=manifest reads no source: run `varcon prepare` where data.root is")
    splits = load_source(d, log)  # a bad source, or a split that empties a class, fails before anything is written
    fingerprints = source_fingerprints(d)
    check_split(split_indices(d, splits["train"].labels, splits["train"].class_names))
    folder = paths["train"].parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_file = Path(str(folder) + ".lock")
    with FileLock(str(lock_file)):
        try:
            if only_if_stale and all(manifests.is_current(p, settings, identity) for p in paths.values()):
                return
            workers = d.writer_workers or os.cpu_count() or 1
            for name, path in paths.items():
                log(f"writing {path} ({len(splits[name])} samples)")
                write_beton(splits[name], path, settings, fingerprints, workers)
        finally:
            # removed while held: a waiting writer then finds its lock's file unlinked and takes a new one
            # (filelock checks the link count after locking)
            lock_file.unlink(missing_ok=True)
