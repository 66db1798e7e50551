"""A training's identity: what changes its trajectory, and the run key derived from it.

The run key names the Ray Train run (its checkpoint folder under ``ray.storage_path``) and tags the MLflow run,
so the same experiment run again (after a crash, with more ``ray.max_failures``, another
``tracking.outage_wait_s`` or ``data.loader_threads``) continues where it stopped. It is
``<name>-<digest of trajectory_settings>``, or ``ray.run_name`` when set.

Every config key is in exactly one of ``TRAJECTORY``, ``OPERATIONAL`` and ``STORED_DATA_KEYS``; a key in none
of them is refused (and a test walks the schema), so a new key needs a decision. The data enters through
``stored_settings`` (what changes the stored bytes) plus the augmentation keys, so e.g. ``data.jpeg_quality``
counts only where JPEG is written.
"""
from __future__ import annotations

import hashlib
import json

from pipeline.config import ExperimentConfig, flatten
from pipeline.data.prepare import stored_settings

# keys that never change what is trained: where things live, how hard to retry, how much to evaluate and log
OPERATIONAL = frozenset({
    "data.download", "data.cache_dir", "data.verify_hash", "data.writer_workers", "data.loader_threads",
    "data.eval_crop_ratio",
    "model.compile",
    "eval.knn_k", "eval.knn_temperature", "eval.every_epochs", "eval.linear_probe_epochs", "eval.few_shot_episodes",
    "eval.at_epochs", "eval.initial_fraction", "eval.test_every_epochs", "eval.probe", "eval.reference_probe_epochs",
    "eval.reference_probe_lr", "eval.reference_probe_batch_per_worker", "eval.reference_probe_lr_batch",
    "ray.cpus_per_worker", "ray.storage_path", "ray.run_name", "ray.max_failures", "ray.checkpoint_every",
    "ray.checkpoint_upload", "ray.placement_strategy", "ray.resource_wait_s", "ray.autoscaler_config",
    "tracking.tracking_uri", "tracking.experiment", "tracking.log_checkpoints", "tracking.registered_model_name",
    "tracking.system_metrics", "tracking.system_metrics_interval_s",
    "tracking.outage_wait_s",
})
# keys that change what is trained, as they are
TRAJECTORY = frozenset({
    "name", "seed",
    "data.image_size", "data.crop_scale_min", "data.horizontal_flip", "data.color_jitter_strength",
    "data.color_jitter_prob", "data.grayscale_prob", "data.loader", "data.val_fraction", "data.val_seed",
    "data.ffcv_views",
    "model.encoder", "model.cifar_stem", "model.width", "model.head_hidden_dim", "model.embedding_dim",
    "model.head_batchnorm",
    "loss.name", "loss.tau1", "loss.eps", "loss.detach_target", "loss.supcon_temperature",
    "loss.supcon_base_temperature", "loss.schedule.kind", "loss.schedule.tau1_end", "loss.schedule.eps_end",
    "loss.schedule.steps", "loss.schedule.epochs", "loss.schedule.tau1_values", "loss.schedule.eps_values",
    "optim.epochs", "optim.global_batch_size", "optim.lr", "optim.momentum", "optim.weight_decay",
    "optim.warmup_epochs", "optim.optimizer", "optim.precision", "optim.warmup_start_lr", "optim.min_lr_ratio",
    "optim.cosine_per", "optim.decay_norm_and_bias",
    "ray.num_workers", "ray.use_gpu",
})
# data keys that change the stored bytes: they enter through ``stored_settings``, normalised (data.image_size
# is in TRAJECTORY: it is the crop size, and stored_settings counts it where it sizes the stored images)
STORED_DATA_KEYS = frozenset({
    "data.dataset", "data.root", "data.test_fraction", "data.split_seed", "data.num_classes",
    "data.train_samples", "data.test_samples", "data.write_mode", "data.max_resolution", "data.jpeg_quality",
    "data.compress_probability", "data.on_bad_image",
})


def trajectory_settings(config: ExperimentConfig) -> dict:
    """``{key: value}`` of everything that changes the training trajectory (strings, as MLflow params)."""
    flat = flatten(config)
    unclassified = set(flat) - TRAJECTORY - OPERATIONAL - STORED_DATA_KEYS
    if unclassified:
        raise RuntimeError(f"config keys {sorted(unclassified)} are in none of pipeline.identity's TRAJECTORY, "
                           f"OPERATIONAL or STORED_DATA_KEYS: decide whether they change the training trajectory")
    settings = {key: value for key, value in flat.items() if key in TRAJECTORY}
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
