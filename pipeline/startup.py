"""The driver's start-up, the same for every command that trains (``varcon train``, ``varcon tune``): each check
fails with one line before the next uses anything, and nothing reaches the cluster before the local checks pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline import storage
from pipeline.cluster import LOCAL_DISK_LABEL, cluster_maximum, init_ray, requested, training_bundles
from pipeline.config import ExperimentConfig
from pipeline.data.preflight import check_staging, preflight, prepare
from pipeline.data.prepare import PreparedDataset
from pipeline.data.staging import DeclaredDisks
from pipeline.tracking import resolve_tracking_uri
from pipeline.tracking_check import check_reachable


@contextmanager
def driver_started(config: ExperimentConfig, wanted: list[dict], smallest: list[dict],
                   log: Callable[[str], None] = print, verbose: bool = False, writable: dict[str, str] | None = None
                   ) -> Iterator[tuple[PreparedDataset, list[dict]]]:
    """In order: the tracking store answers; ``ray.storage_path`` (and each of ``writable``, ``{key: path}``)
    can be written; the data passes ``preflight`` (the prepared files, their source's identity, or a source
    that can be prepared, and prepared files that fit the local disk they are staged to: every data check, so a
    bad source never costs a node); Ray is up (``cluster.init_ray``); the autoscaler is asked for the ``wanted``
    bundles, waiting ``ray.resource_wait_s`` for at least ``smallest`` (``cluster.requested``, held for the block;
    what can never fit is refused before asking); the dataset is prepared (files missing are written while nodes
    boot, then checked against the local disks like prepared ones). Yields the prepared dataset and the bundles
    the cluster has."""
    check_reachable(resolve_tracking_uri(config.tracking.tracking_uri), config.tracking.experiment)
    for key, path in {"ray.storage_path": config.ray.storage_path, **(writable or {})}.items():
        storage.check_writable(storage.location(path), key)
    disks = declared_disks(config)
    preflight(config, disks)
    init_ray(verbose, log)
    with requested(wanted, smallest, config.ray.resource_wait_s, config.ray.autoscaler_config, log) as have:
        files = prepare(config, log, for_training=True)  # writes what is missing while nodes boot
        check_staging(config, files, disks)
        yield files, have


def declared_disks(config: ExperimentConfig) -> DeclaredDisks | None:
    """The local disk declared by each node type of the cluster's config that can hold a training worker."""
    maximum = cluster_maximum(config.ray.autoscaler_config)
    if maximum is None:
        return None
    r = config.ray
    worker = training_bundles(1, r.cpus_per_worker, r.use_gpu)[0]
    return DeclaredDisks(maximum.local_disks(worker), f"{maximum.source} (labels: {LOCAL_DISK_LABEL})")
