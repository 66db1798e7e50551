"""A training's identity: what changes its trajectory, and the run key derived from it.

The run key names the Ray Train run (its checkpoint folder under ``ray.storage_path``) and tags the MLflow run,
so the same experiment run again (after a crash, with more ``ray.max_failures``, another
``tracking.outage_wait_s`` or ``data.loader_threads``) continues where it stopped. It is
``<name>-<digest of trajectory_settings>``, or ``ray.run_name`` when set.

Each config key declares its class in the schema beside its description (``pipeline.config.trajectory``,
``operational`` or ``stored``); this module holds the rules. A key without a class is refused here (and a test
walks the schema), so a new key needs a decision. The data enters through
``stored_settings`` (what changes the stored bytes) plus the augmentation keys, so e.g. ``data.jpeg_quality``
counts only where JPEG is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator

from pipeline.config import ExperimentConfig, flatten
from pipeline.data.prepare import stored_settings


def _leaves(schema: type = ExperimentConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, object]]:
    """``(dotted key, field, default)`` of every leaf key of the schema."""
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaves(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, default


def identity_classes(schema: type = ExperimentConfig) -> dict[str, str]:
    """``{dotted key: identity class}`` of every leaf key, as the schema declares it (``pipeline.config.setting``:
    ``trajectory``, ``operational`` or ``stored``; "" where a key declares none)."""
    return {key: f.metadata.get("identity", "") for key, f, _ in _leaves(schema)}


CLASSES = identity_classes()
# trajectory keys declared ``added`` (they came after run keys existed): in a run's identity only when set away
# from their default (as ``flatten`` writes it), so runs keyed before them keep their keys
ADDED = {key: str(default) for key, f, default in _leaves() if f.metadata.get("added")}
# keys that change what is trained, as they are
TRAJECTORY = frozenset(key for key, kind in CLASSES.items() if kind == "trajectory")
# keys that never change what is trained: where things live, how hard to retry, how much to evaluate and log
OPERATIONAL = frozenset(key for key, kind in CLASSES.items() if kind == "operational")
# data keys that change the stored bytes: they enter through ``stored_settings``, normalised (data.image_size
# is a trajectory key: it is the crop size, and stored_settings counts it where it sizes the stored images)
STORED_DATA_KEYS = frozenset(key for key, kind in CLASSES.items() if kind == "stored")


def trajectory_settings(config: ExperimentConfig) -> dict:
    """``{key: value}`` of everything that changes the training trajectory (strings, as MLflow params)."""
    flat = flatten(config)
    unclassified = set(flat) - TRAJECTORY - OPERATIONAL - STORED_DATA_KEYS
    if unclassified:
        raise RuntimeError(f"config keys {sorted(unclassified)} declare no identity class: define them with "
                           f"pipeline.config's trajectory, operational or stored (does it change what is trained?)")
    settings = {key: value for key, value in flat.items()
                if key in TRAJECTORY and not (key in ADDED and value == ADDED[key])}
    settings["data.stored"] = json.dumps(stored_settings(config.data), sort_keys=True)
    return settings


def identity_digest(config: ExperimentConfig) -> str:
    return hashlib.sha256(json.dumps(trajectory_settings(config), sort_keys=True).encode()).hexdigest()[:8]


def run_key(config: ExperimentConfig) -> str:
    """``ray.run_name``, else ``<name>-<identity digest>``."""
    return config.ray.run_name or f"{config.name}-{identity_digest(config)}"


def changed_keys(recorded: dict[str, str], config: ExperimentConfig) -> dict[str, tuple[str, str]]:
    """``{key: (recorded, now)}`` for the keys whose value differs from the MLflow params ``recorded``."""
    return {key: (recorded.get(key, "<absent>"), value) for key, value in flatten(config).items()
            if recorded.get(key) != value}
