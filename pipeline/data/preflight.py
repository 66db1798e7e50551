"""The data checks of a command that trains, in the data layer: the prepared dataset of a config, and what its
files (or its source, where nothing is prepared yet) already tell before Ray starts and before the autoscaler is
asked for anything (``preflight``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, ExperimentConfig, resolve_path
from pipeline.data import staging
from pipeline.data.prepare import SPLITS, PreparedDataset, dataset_folder, prepare_dataset, prepared_split
from pipeline.data.source_identity import FILE_SOURCES
from pipeline.data.sources import DataError
from pipeline.data.splits import SplitIndices


def prepare(config: ExperimentConfig, log: Callable[[str], None] = print, repair: bool = False,
            for_training: bool = False) -> PreparedDataset:
    """The prepared dataset of ``config``; ``for_training`` also refuses batches larger than the training
    samples, before any file is written."""
    check = (lambda split: check_batches_fit(config, split)) if for_training else None
    return prepare_dataset(config.data, resolve_path(config.data.cache_dir), log=log, repair=repair,
                           check_split=check)


def preflight(config: ExperimentConfig, disks: staging.DeclaredDisks | None = None) -> None:
    """What a prepared dataset's files already tell, checked before Ray starts: their integrity, the batches
    against the training samples, a loss against a single class, and that they fit the local ``disks`` they are
    staged to. (A dataset not prepared yet is checked by ``prepare`` before it writes anything, and its staging
    by ``check_staging`` once written.)"""
    d = config.data
    found = prepared_split(d, resolve_path(d.cache_dir))
    if found is None:
        root = Path(d.root).expanduser()
        if d.loader == "ffcv" and d.dataset in FILE_SOURCES and not root.exists():
            raise DataError(f"data.root={d.root} is not visible here and no prepared files record it under "
                            f"{resolve_path(d.cache_dir)}: run `varcon prepare` where the source is (on a cluster: "
                            f"a CPU job), with the same config")
        return
    split, names = found
    if len(names) < 2:
        raise ConfigError(f"{config.data.dataset} has {len(names)} class: {config.loss.name} needs at least 2 "
                          f"(check data.root)")
    check_batches_fit(config, split)
    folder = dataset_folder(d, resolve_path(d.cache_dir))
    staging.check_fits([folder / f"{name}.beton" for name in SPLITS], d.stage, disks)


def check_staging(config: ExperimentConfig, files: PreparedDataset, disks: staging.DeclaredDisks | None) -> None:
    """``files`` (just prepared) fit the local ``disks`` they are staged to."""
    staging.check_fits([Path(p) for p in (files.train, files.test) if p], config.data.stage, disks)


def check_batches_fit(config: ExperimentConfig, split: SplitIndices) -> None:
    """Refuse a training whose batches exceed its training samples (the split minus validation)."""
    trained = len(split.bank)
    batches = {"optim.global_batch_size": (config.optim.global_batch_size, config.optim.global_batch_size, "")}
    if config.eval.probe in ("reference", "both"):  # its global batch: per worker x workers
        per_worker, workers = config.eval.reference_probe_batch_per_worker, config.ray.num_workers
        batches["eval.reference_probe_batch_per_worker"] = (
            per_worker, per_worker * workers, f" x ray.num_workers={workers} = {per_worker * workers}")
    for key, (value, size, product) in batches.items():
        if size > trained:
            raise ConfigError(f"{key}={value}{product} exceeds the {trained} training samples of "
                              f"{config.data.dataset} (the training split minus {len(split.val)} for validation): "
                              f"lower {key}")
