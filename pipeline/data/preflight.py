"""The data checks of a command that trains, in the data layer: the prepared dataset of a config, and what its
files already tell before Ray starts (``preflight``)."""
from __future__ import annotations

from collections.abc import Callable

from pipeline.config import ConfigError, ExperimentConfig, resolve_path
from pipeline.data.prepare import PreparedDataset, prepare_dataset, prepared_split
from pipeline.data.splits import SplitIndices


def prepare(config: ExperimentConfig, log: Callable[[str], None] = print, repair: bool = False,
            for_training: bool = False) -> PreparedDataset:
    """The prepared dataset of ``config``; ``for_training`` also refuses batches larger than the training
    samples, before any file is written."""
    check = (lambda split: check_batches_fit(config, split)) if for_training else None
    return prepare_dataset(config.data, resolve_path(config.data.cache_dir), log=log, repair=repair,
                           check_split=check)


def preflight(config: ExperimentConfig) -> None:
    """What a prepared dataset's files already tell, checked before Ray starts: their integrity, the batches
    against the training samples, and a loss against a single class. (A dataset not prepared yet is checked by
    ``prepare`` before it writes anything.)"""
    found = prepared_split(config.data, resolve_path(config.data.cache_dir))
    if found is None:
        return
    split, names = found
    if len(names) < 2:
        raise ConfigError(f"{config.data.dataset} has {len(names)} class: {config.loss.name} needs at least 2 "
                          f"(check data.root)")
    check_batches_fit(config, split)


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
