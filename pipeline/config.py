"""Experiment configuration: a typed schema, YAML loading, dotted overrides, validation, flattening.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads a YAML file (or the bundled default),
applies ``section.key=value`` overrides, checks every value and returns an ``ExperimentConfig``. Every mistake a
user can make ends in one ``ConfigError`` whose message names the fix.

Past 400 lines on purpose: 170 of them are the schema's declarations (each key's type, default, description and
identity class, one per line), which belong beside the loading and the checks that read them.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.schedules import schedule_problem

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "digits.yaml"


def workdir() -> Path:
    """Base of every relative path in a config (caches, stores): ``$VARCON_HOME``, else the current directory."""
    return Path(os.environ.get("VARCON_HOME") or os.getcwd()).resolve()


def resolve_path(path: str) -> Path:
    """An absolute path: ``path`` itself, or ``path`` under ``workdir()``."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else workdir() / candidate


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the fix."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a dependency's exception, for a one-line error that names the fix."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


IDENTITY_CLASSES = ("trajectory", "operational", "stored")


# The field specifiers below return ``Any``, as ``dataclasses.field`` does for a type checker: the ``Field`` they
# make stands for a value of the field's declared type (``dataset: str = stored(...)``).
def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
            factory: Callable[[], Any] | None = None, identity: str = "", added: bool = False) -> Any:
    """A schema field, its one-line description and (a key, not a section) its identity class, held in the
    field's metadata: ``varcon config --keys`` prints the descriptions and ``pipeline.identity`` reads the classes,
    so the schema is the one place a key is described and classified. Keys use ``trajectory``, ``operational``
    or ``stored`` below."""
    if not help:
        raise TypeError("every config key needs a description")
    if identity and identity not in IDENTITY_CLASSES:
        raise TypeError(f"identity {identity!r} is not one of {IDENTITY_CLASSES}")
    metadata = {"help": help, "identity": identity, "added": added}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def trajectory(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
               factory: Callable[[], Any] | None = None, added: bool = False) -> Any:
    """A key that changes what is trained: part of the run's identity (``pipeline.identity``). ``added``: a key
    that came after run keys existed enters the identity only when set away from its default, so runs keyed
    before it keep their keys."""
    return setting(default, help, factory=factory, identity="trajectory", added=added)


def operational(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
                factory: Callable[[], Any] | None = None) -> Any:
    """A key that never changes what is trained: where things live, how hard to retry, how much to evaluate."""
    return setting(default, help, factory=factory, identity="operational")


def stored(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
           factory: Callable[[], Any] | None = None) -> Any:
    """A data key that changes the stored bytes: it enters the identity through ``stored_settings``."""
    return setting(default, help, factory=factory, identity="stored")


@dataclass
class DataConfig:
    dataset: str = stored("digits", "digits | synthetic | cifar10 | cifar100 | imagefolder")
    root: str = stored("", "source folder (cifar: the python-pickle layout; imagefolder: train/ and val/ inside)")
    download: bool = operational(False, "cifar only: fetch the dataset into root (needs internet; never implicit)")
    cache_dir: str = operational(".cache/data", "where .beton files and their manifests are written")
    image_size: int = trajectory(32, "side of the trained images (and of generated sources)")
    test_fraction: float = stored(0.25, "digits: held-out share (seeded, stratified split)")
    val_fraction: float = trajectory(0.1, "validation share carved from the training split by index "
                                       "(pipeline.data.splits): what selects (monitor, best checkpoint, sweeps) reads"
                                       " it; 0 = train on all of it")
    val_seed: int = trajectory(0, "draws the validation indices (per class)")
    split_seed: int = stored(0, "digits: split seed; synthetic: generator seed")
    num_classes: int = stored(10, "synthetic only: classes generated")
    train_samples: int = stored(2000, "synthetic only: training images generated")
    test_samples: int = stored(500, "synthetic only: test images generated")
    write_mode: str = stored("raw", "FFCV image storage: raw | jpg | smart | proportion")
    max_resolution: int = stored(0, "longest stored side; 0 = image_size")
    jpeg_quality: int = stored(90, "JPEG quality of images stored as JPEG (write_mode jpg | smart | proportion)")
    compress_probability: float = stored(0.5, "write_mode=proportion: share of images stored as JPEG")
    on_bad_image: str = stored("fail", "imagefolder: fail | skip (and count) on an unreadable image")
    source_check: str = operational("auto", "what a start reads of the source to know the prepared files are its "
                                            "own: walk (every file) | folders (the class folders) | manifest "
                                            "(nothing: trust varcon prepare's record) | auto (manifest where "
                                            "data.root is not visible, folders for image folders, else walk); "
                                            "see pipeline.data.source_identity")
    verify_hash: str = operational("auto", "sha256 check of .beton files before training: auto (<= 1 GiB) | always | "
                                           "never")
    scan_threads: int = operational(0, "threads listing, stat'ing and checking a source's files (varcon prepare, "
                                       "source_check=walk) so that NFS round trips overlap; 0 = auto (32 on a "
                                       "network file system, 1 on a local disk: pipeline.data.file_scan)")
    writer_workers: int = operational(0, "processes writing .beton files; 0 = all cores")
    stage: str = operational("none", "where training reads the .beton files (pipeline.data.staging): none | local "
                                     "(copied once per node to stage_dir) | cache (page cache warmed) | auto (local "
                                     "where stage_dir exists)")
    stage_dir: str = operational("", "data.stage=local: a local disk folder on every node (cluster.yaml: the NVMe)")
    stage_limit_gb: float = operational(0.0, "data.stage=local: evict the least recently used copies past this "
                                             "size; 0 = no limit")
    eval_crop_ratio: float = operational(1.0, "evaluation centre crop (ImageNet: 0.875, i.e. 224 of 256)")
    crop_scale_min: float = trajectory(0.2, "RandomResizedCrop scale range (min, 1.0)")
    horizontal_flip: bool = trajectory(True, "random horizontal flip of each view")
    color_jitter_strength: float = trajectory(0.4, "brightness/contrast/saturation magnitude, hue = strength/4; 0 "
                                                "disables")
    color_jitter_prob: float = trajectory(0.8, "probability of colour jitter per view")
    grayscale_prob: float = trajectory(0.2, "probability of converting a view to grayscale")
    loader: str = trajectory("ffcv", "ffcv | torchvision (reads the source directly; the fallback without FFCV)")
    loader_threads: int = operational(1, "per training worker: FFCV pipeline threads, or torchvision DataLoader "
                                         "processes")
    ffcv_views: str = trajectory("decode_once", "decode_once (one decode, seeded crops, bilinear) | two_pipelines "
                                             "(FFCV's own: two decodes, unseeded crops, area resize)")


@dataclass
class ModelConfig:
    encoder: str = trajectory("small_cnn", "small_cnn | resnet18 | resnet50 | ...")
    cifar_stem: bool = trajectory(True, "3x3 stride-1 first conv and no max-pool (ResNets only)")
    width: int = trajectory(64, "channels of small_cnn's first block")
    head_hidden_dim: int = trajectory(512, "hidden width of the projection head")
    head_batchnorm: bool = trajectory(True, "ours: BatchNorm after the head's first layer; the references: "
                                         "Linear-ReLU-Linear")
    embedding_dim: int = trajectory(128, "output dimension of the projection head (the contrastive embedding)")
    compile: bool = operational(False, "torch.compile the model")


@dataclass
class ScheduleConfig:
    """How VarCon's tau1 and eps change over training (see ``pipeline.schedules``)."""

    kind: str = trajectory("constant", "constant | linear | cosine | step | piecewise | periodic")
    tau1_end: float | None = trajectory(None, "linear/cosine/step: the last epoch's tau1 (default: loss.tau1)")
    eps_end: float | None = trajectory(None, "linear/cosine/step: the last epoch's eps (default: loss.eps)")
    steps: int = trajectory(4, "step: equal phases, each at one value")
    period: int = trajectory(0, "periodic: epochs of one oscillation of tau1 (Kukleva et al.'s T)", added=True)
    tau1_half_period: float | None = trajectory(None, "periodic: tau1 at each half period, the other bound (loss.tau1 "
                                                      "is the value at epoch 1 and every period after)", added=True)
    eps_rule: str = trajectory("ratio", "periodic: eps follows tau1 at loss.eps / loss.tau1 (ratio) or stays loss.eps "
                                        "(fixed)", added=True)
    epochs: list[int] = trajectory(factory=list, help="piecewise: the epoch at which each value starts (first: 1)")
    tau1_values: list[float] = trajectory(factory=list, help="piecewise: tau1 from each of those epochs on")
    eps_values: list[float] = trajectory(factory=list, help="piecewise: eps from each of those epochs on")


@dataclass
class LossConfig:
    name: str = trajectory("varcon", "varcon | supcon | cross_entropy")
    tau1: float = trajectory(0.1, "the first epoch's tau1 (all epochs' under the constant schedule)")
    eps: float = trajectory(0.02, "the first epoch's dispersion range eps (0 <= eps < tau1): tau2 lies in [tau1 - eps, "
                               "tau1 + eps]")
    schedule: ScheduleConfig = setting(factory=ScheduleConfig, help="temperature schedule of tau1 and eps")
    detach_target: bool = trajectory(False, "VarCon: stop the gradient through the confidence-adaptive target")
    supcon_temperature: float = trajectory(0.1, "SupCon: temperature")
    supcon_base_temperature: float = trajectory(0.07, "SupCon: base temperature (the loss is scaled by temperature / "
                                                   "base_temperature)")


@dataclass
class OptimConfig:
    epochs: int = trajectory(10, "training epochs")
    global_batch_size: int = trajectory(256, "images per step summed over all workers (each image gives two views)")
    lr: float = trajectory(0.5, "learning rate for the global batch, used as is (never rescaled)")
    momentum: float = trajectory(0.9, "SGD (or LARS) momentum")
    weight_decay: float = trajectory(1e-4, "weight decay (weights only unless decay_norm_and_bias)")
    warmup_epochs: int = trajectory(1, "epochs of linear learning-rate warm-up before the cosine schedule")
    warmup_start_lr: float = trajectory(0.0, "absolute lr of the first warm-up step, then linear to the schedule's "
                                             "value"
                                          " at the end of warm-up (the references); 0 = ours: lr * (step + 1) / "
                                          "warm-up steps")
    min_lr_ratio: float = trajectory(0.0, "cosine floor as a share of lr (the references: 1e-3)")
    cosine_per: str = trajectory("step", "step (ours) | epoch (the references step the cosine once per epoch)")
    decay_norm_and_bias: bool = trajectory(False, "also decay biases and norm weights (the references decay every "
                                               "parameter)")
    optimizer: str = trajectory("sgd", "sgd | lars (timm's LARS, for very large batches)")
    precision: str = trajectory("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32")


@dataclass
class EvalConfig:
    knn_k: list[int] = operational(factory=lambda: [20, 200], help="k of the weighted kNN classifiers (one metric per "
                                                                   "k)")
    knn_temperature: float = operational(0.1, "temperature of the weighted kNN vote")
    every_epochs: int = operational(1, "validation kNN monitor frequency (needs data.val_fraction > 0)")
    at_epochs: list[int] = operational(factory=list, help="the monitor's epochs instead of every_epochs (sweeps: the "
                                                      "scheduler's rungs); the last epoch is always evaluated")
    initial_fraction: float = operational(1.0, "epoch-0 monitor on this seeded share of bank and validation; 0 = none")
    test_every_epochs: int = operational(0, "a test kNN curve every n epochs (never selects); 0 = the test split at "
                                            "the "
                                        "end only")
    final_split: str = operational("test", "test | val: the split of the final dispersion, few-shot episodes, "
                                           "embedding plots and confusion matrix; val reads no test split at all, "
                                           "kNN and probes score validation only (a search trial: selection on "
                                           "validation, the test split left to the chosen configuration's "
                                           "retraining); needs data.val_fraction > 0 and eval.test_every_epochs 0")
    probe: str = operational("features", "final linear probe: features (standardised frozen features) | reference "
                                         "(frozen"
                                     " encoder, training crops, the papers' SGD schedule) | both")
    linear_probe_epochs: int = operational(100, "the features probe's epochs; 0 skips it")
    reference_probe_epochs: int = operational(100, "the reference probe: epochs (lr x0.2 at 60%, 75%, 90% of them)")
    reference_probe_batch_per_worker: int = operational(128, "the reference probe's images per worker per step; the "
                                                         "global batch is this x ray.num_workers (the reference: 128 "
                                                         "x 8 GPUs = 1,024), logged as refprobe_global_batch")
    reference_probe_lr: float = operational(5.0, "the reference probe's lr at reference_probe_lr_batch images per step "
                                             "(the reference: 5.0 at 1,024); the run uses it x global batch / "
                                             "reference_probe_lr_batch, logged as refprobe_lr")
    reference_probe_lr_batch: int = operational(1024, "the global batch that reference_probe_lr is given for")
    few_shot_episodes: int = operational(200, "final 5-way 1-/5-shot nearest-class-mean episodes; 0 skips them")


@dataclass
class RayConfig:
    num_workers: int = trajectory(2, "Ray Train workers (DDP processes, one GPU each with use_gpu)")
    use_gpu: bool = trajectory(False, "train on GPUs (one per worker)")
    cpus_per_worker: float = operational(1.0, "CPUs each worker reserves (also its torch threads)")
    storage_path: str = operational(".cache/ray_results", "Ray Train run storage (checkpoints); shared on a cluster")
    run_name: str = operational("", "the run key by hand; default <name>-<digest of the trajectory settings> "
                                "(pipeline.identity)")
    max_failures: int = operational(2, "worker-group restarts from the last checkpoint before the run fails")
    max_preemption_failures: int = operational(-1, "restarts after a node drained for preemption (a spot notice), "
                                                   "counted apart from ray.max_failures; -1 = unlimited "
                                                   "(Ray Train's FailureConfig.max_preemption_failures)")
    checkpoint_every: int = operational(1, "epochs between checkpoints (the last epoch is always checkpointed)")
    checkpoint_at_epochs: list[int] = operational(factory=list, help="epochs checkpointed besides every "
                                                  "checkpoint_every (sweeps: the scheduler's rungs, so the result "
                                                  "that stops a trial is in its checkpoint and its MLflow run)")
    preemption_check_steps: int = operational(200, "training steps (counted across epochs) between asks for a "
                                                   "preemption notice (Ray Train's get_preemption_info, a "
                                                   "collective), also asked at each epoch's end: on a notice rank 0 "
                                                   "checkpoints within the epoch; 0 = never ask")
    checkpoint_upload: str = operational("sync", "sync | async: Ray uploads the checkpoint in the background while "
                                             "training goes on (Ray Train's CheckpointUploadMode.ASYNC; worth it for "
                                             "bucket storage)")
    placement_strategy: str = operational("PACK", "PACK | SPREAD | STRICT_SPREAD (one worker per node)")
    resource_wait_s: float = operational(1800.0, "on a running cluster: how long to wait for the autoscaler to add "
                                             "the CPUs/GPUs a run needs before failing (a local instance fails at "
                                             "once); a cold p4d boots and runs scripts/node_setup.sh (CUDA torch, "
                                             "FFCV's build) in ~10-17 min (README: On a GPU cluster)")
    autoscaler_config: str = operational("~/ray_bootstrap_config.yaml", "the cluster's autoscaler config (where `ray "
                                                                        "up` "
                                                                    "puts it on the head): what exceeds its node "
                                                                    "types x max_workers is refused at once; absent: "
                                                                    "not checked")


@dataclass
class TrackingConfig:
    tracking_uri: str = operational("", "default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/.cache/mlflow/mlflow.db")
    experiment: str = operational("varcon", "MLflow experiment name")
    log_checkpoints: bool = operational(True, "log the final and best full checkpoints (state.pt) as run artifacts")
    registered_model_name: str = operational("", "register the final encoder in the Model Registry under this name")
    system_metrics: str = operational("auto", "always | never | auto (GPU training only): CPU/memory/GPU utilisation "
                                          "of every node in the run's System metrics tab (MLflow's monitor)")
    system_metrics_interval_s: float = operational(10.0, "seconds between system-metric samples")
    outage_wait_s: float = operational(120.0, "at the end of a run, keep trying an unreachable store this long; then "
                                              "what"
                                          " it did not take stays in the final checkpoint and the same command sends "
                                          "it later")


@dataclass
class ExperimentConfig:
    name: str = trajectory("digits-varcon", "run name: the Ray Train run key's prefix and the MLflow run name")
    seed: int = trajectory(0, "seed of the model, loader and augmentation RNGs")
    data: DataConfig = setting(factory=DataConfig, help="data section")
    model: ModelConfig = setting(factory=ModelConfig, help="model section")
    loss: LossConfig = setting(factory=LossConfig, help="loss section")
    optim: OptimConfig = setting(factory=OptimConfig, help="optimisation section")
    eval: EvalConfig = setting(factory=EvalConfig, help="evaluation section")
    ray: RayConfig = setting(factory=RayConfig, help="Ray section")
    tracking: TrackingConfig = setting(factory=TrackingConfig, help="MLflow section")


DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
ENCODERS = ("small_cnn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
LOSSES = ("varcon", "supcon", "cross_entropy")
PROBES = ("features", "reference", "both")
REPLACED_KEYS = {  # a key that was removed, and what to write instead
    "eval.reference_probe_batch_size": "set eval.reference_probe_batch_per_worker (the global batch is it x "
                                       "ray.num_workers; eval.reference_probe_lr is given at "
                                       "eval.reference_probe_lr_batch images and scaled to it)",
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read YAML ``path`` (default: configs/digits.yaml), apply ``key=value`` overrides, validate.

    A file may name another with ``base: other.yaml`` (relative to itself): its values are the defaults.
    """
    return build_config(_read_yaml(Path(path) if path else DEFAULT_CONFIG, ()), overrides)


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} names itself as a base (through {chain[-1]}): remove the cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({yaml_problem(exc)}): fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(path.parent / str(base), chain + (path.resolve(),)), raw)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML syntax error: what and where."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(exc, "problem", None) or exc).split())


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def build_config(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Apply ``key=value`` overrides to a nested dict of sections, then check it and build the config."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    config = build_dataclass(ExperimentConfig, raw, "")
    validate(config)
    return config


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``dotted="a.b"``, creating sections on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is a value, not a section")
    node[leaf] = value


def build_dataclass(cls: type, raw: dict, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, not {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            if f"{prefix}{key}" in REPLACED_KEYS:
                raise ConfigError(f"config key {prefix}{key} was replaced: {REPLACED_KEYS[prefix + key]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build_dataclass(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, name: str) -> Any:
    if kind is Any:
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # ``X | None``
        if value is None:
            return None
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        origin = typing.get_origin(kind)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        values = value if isinstance(value, list) else [value]
        return [_coerce(v, item_kind, name) for v in values]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name} must be of type {getattr(kind, '__name__', kind)}, got {value!r}")


def validate(config: ExperimentConfig) -> None:
    """Check value ranges and cross-field constraints; raise ``ConfigError`` naming the fix."""
    d, m, lo, o, r = config.data, config.model, config.loss, config.optim, config.ray

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    safe_name = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    need(bool(safe_name.fullmatch(config.name)), f"name={config.name!r} may hold only letters, digits, '.', '_' "
         f"and '-' (it names the run's folder and MLflow run)")
    need(not r.run_name or bool(safe_name.fullmatch(r.run_name)),
         f"ray.run_name={r.run_name!r} may hold only letters, digits, '.', '_' and '-'")
    need(d.dataset in DATASETS, f"data.dataset={d.dataset!r} is unknown: use one of {', '.join(DATASETS)}")
    need(m.encoder in ENCODERS, f"model.encoder={m.encoder!r} is unknown: use one of {', '.join(ENCODERS)}")
    need(lo.name in LOSSES, f"loss.name={lo.name!r} is unknown: use one of {', '.join(LOSSES)}")
    need(d.image_size >= 8, "data.image_size must be at least 8")
    need(d.dataset not in ("cifar10", "cifar100", "imagefolder") or bool(d.root) or d.download,
         f"data.root is empty: set it to the folder holding the {d.dataset} data")
    need(d.download is False or d.dataset in ("cifar10", "cifar100"), "data.download works for cifar10/cifar100 only")
    need(d.write_mode in WRITE_MODES,
         f"data.write_mode={d.write_mode!r} is unknown: use one of {', '.join(WRITE_MODES)}")
    need(d.on_bad_image in ("fail", "skip"), f"data.on_bad_image={d.on_bad_image!r} must be fail or skip")
    need(d.source_check in ("auto", "walk", "folders", "manifest"),
         f"data.source_check={d.source_check!r} must be auto, walk, folders or manifest")
    need(d.stage in ("none", "local", "cache", "auto"), f"data.stage={d.stage!r} must be none, local, cache or auto")
    need(d.stage != "local" or bool(d.stage_dir), "data.stage=local needs data.stage_dir (a local disk folder)")
    need(d.stage_limit_gb >= 0, f"data.stage_limit_gb={d.stage_limit_gb} must be >= 0")
    need(d.verify_hash in ("auto", "always", "never"),
         f"data.verify_hash={d.verify_hash!r} must be auto, always or never")
    need(d.num_classes >= 2 and d.train_samples >= 1 and d.test_samples >= 1,
         "data.num_classes must be >= 2 and data.train_samples, data.test_samples >= 1")
    need(d.max_resolution >= 0 and 1 <= d.jpeg_quality <= 100 and 0 <= d.compress_probability <= 1,
         "data.max_resolution must be >= 0, data.jpeg_quality in [1, 100], data.compress_probability in [0, 1]")
    need(0 < d.eval_crop_ratio <= 1, "data.eval_crop_ratio must lie in (0, 1]")
    need(d.writer_workers >= 0, "data.writer_workers must be >= 0")
    need(d.scan_threads >= 0, "data.scan_threads must be >= 0 (0 = auto, 1 = one file at a time)")
    need(d.loader in ("ffcv", "torchvision"), f"data.loader={d.loader!r} must be ffcv or torchvision")
    need(0.0 < d.test_fraction < 1.0, "data.test_fraction must lie strictly between 0 and 1")
    need(0.0 <= d.val_fraction <= 0.5, f"data.val_fraction={d.val_fraction} must lie in [0, 0.5] (0: no validation "
         f"split, nothing is selected)")
    need(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min must lie in (0, 1]")
    for key in ("color_jitter_prob", "grayscale_prob"):
        need(0.0 <= getattr(d, key) <= 1.0, f"data.{key} must lie in [0, 1]")
    need(d.color_jitter_strength >= 0, "data.color_jitter_strength must be >= 0")
    need(d.loader_threads >= 0, "data.loader_threads must be >= 0")
    need(d.ffcv_views in ("decode_once", "two_pipelines"),
         f"data.ffcv_views={d.ffcv_views!r} must be decode_once or two_pipelines")
    need(m.embedding_dim >= 2 and m.head_hidden_dim >= 1 and m.width >= 1, "model dimensions must be positive")
    need(lo.tau1 > 0, f"loss.tau1={lo.tau1} must be > 0 (the paper uses 0.1)")
    need(lo.eps >= 0, f"loss.eps={lo.eps} must be >= 0 (the paper uses 0.02)")
    need(lo.eps < lo.tau1, f"loss.eps={lo.eps} must be smaller than loss.tau1={lo.tau1}")
    problem = schedule_problem(lo, o.epochs)
    need(problem is None, problem or "")
    need(lo.supcon_temperature > 0 and lo.supcon_base_temperature > 0, "SupCon temperatures must be > 0")
    need(o.epochs >= 1, f"optim.epochs={o.epochs} must be >= 1")
    need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    need(o.momentum >= 0 and o.weight_decay >= 0, "optim.momentum and optim.weight_decay must be >= 0")
    need(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs must be >= 0 and smaller than optim.epochs")
    need(0 <= o.warmup_start_lr <= o.lr, f"optim.warmup_start_lr={o.warmup_start_lr} must lie in [0, optim.lr]")
    need(0 <= o.min_lr_ratio < 1, f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1)")
    need(o.cosine_per in ("step", "epoch"), f"optim.cosine_per={o.cosine_per!r} must be step or epoch")
    need(r.num_workers >= 1, f"ray.num_workers={r.num_workers} must be >= 1")
    need(r.cpus_per_worker > 0, "ray.cpus_per_worker must be > 0")
    need(r.resource_wait_s >= 0, "ray.resource_wait_s must be >= 0")
    need(r.max_preemption_failures >= -1, "ray.max_preemption_failures must be >= 0, or -1 for unlimited")
    need(config.tracking.outage_wait_s >= 0, "tracking.outage_wait_s must be >= 0")
    need(r.max_failures >= 0 and r.checkpoint_every >= 1, "ray.max_failures must be >= 0, ray.checkpoint_every >= 1")
    need(all(1 <= epoch <= o.epochs for epoch in r.checkpoint_at_epochs),
         f"ray.checkpoint_at_epochs={r.checkpoint_at_epochs} must list epochs between 1 and optim.epochs={o.epochs}")
    need(r.preemption_check_steps >= 0, "ray.preemption_check_steps must be >= 0 (0 = never ask for a notice)")
    need(config.tracking.system_metrics in ("always", "never", "auto"),
         f"tracking.system_metrics={config.tracking.system_metrics!r} must be always, never or auto")
    need(config.tracking.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s must be > 0")
    need(r.checkpoint_upload in ("sync", "async"),
         f"ray.checkpoint_upload={r.checkpoint_upload!r} must be sync or async")
    need(r.placement_strategy in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"),
         f"ray.placement_strategy={r.placement_strategy!r} must be PACK, SPREAD, STRICT_SPREAD or STRICT_PACK")
    need(o.optimizer in ("sgd", "lars"), f"optim.optimizer={o.optimizer!r} must be sgd or lars")
    need(o.precision in ("auto", "bf16", "fp32"), f"optim.precision={o.precision!r} must be auto, bf16 or fp32")
    e = config.eval
    need(e.linear_probe_epochs >= 0 and e.few_shot_episodes >= 0,
         "eval.linear_probe_epochs and eval.few_shot_episodes must be >= 0")
    need(e.probe in PROBES, f"eval.probe={e.probe!r} must be one of {', '.join(PROBES)}")
    need(e.reference_probe_batch_per_worker >= 1,
         f"eval.reference_probe_batch_per_worker={e.reference_probe_batch_per_worker} must be >= 1: images per worker "
         f"per step (the reference: 128 on 8 workers)")
    need(e.reference_probe_lr_batch >= 1,
         f"eval.reference_probe_lr_batch={e.reference_probe_lr_batch} must be >= 1: the global batch that "
         f"eval.reference_probe_lr is given for (the reference: 1024)")
    if e.probe in ("reference", "both"):
        need(e.reference_probe_epochs >= 1 and e.reference_probe_lr > 0,
             f"eval.probe={e.probe} needs eval.reference_probe_epochs >= 1 and eval.reference_probe_lr > 0")
    need(0.0 <= e.initial_fraction <= 1.0, f"eval.initial_fraction={e.initial_fraction} must lie in [0, 1]")
    need(e.test_every_epochs >= 0, "eval.test_every_epochs must be >= 0")
    need(e.final_split in ("test", "val"), f"eval.final_split={e.final_split!r} must be test or val")
    need(e.final_split == "test" or (config.data.val_fraction > 0 and e.test_every_epochs == 0),
         "eval.final_split=val reads no test split: it needs data.val_fraction > 0 and eval.test_every_epochs=0")
    need(all(1 <= epoch <= o.epochs for epoch in e.at_epochs),
         f"eval.at_epochs={e.at_epochs} must list epochs between 1 and optim.epochs={o.epochs}")
    need(
        o.global_batch_size >= 1 and o.global_batch_size % r.num_workers == 0,
        f"optim.global_batch_size={o.global_batch_size} must be a positive multiple of ray.num_workers="
        f"{r.num_workers}: change one of them",
    )
    need(all(k >= 1 for k in config.eval.knn_k) and config.eval.knn_k, "eval.knn_k must list positive integers")
    need(config.eval.knn_temperature > 0, "eval.knn_temperature must be > 0")
    need(config.eval.every_epochs >= 1, "eval.every_epochs must be >= 1")


def describe_keys(schema: type = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, description)`` of every leaf key of a config dataclass (default:
    ``ExperimentConfig``), read from the fields' metadata (``setting``)."""
    rows = []
    for f in dataclasses.fields(schema or ExperimentConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += describe_keys(type(default), f"{prefix}{f.name}.")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f"{prefix}{f.name}", kind, yaml.safe_dump(default, default_flow_style=True).strip()
                     .removesuffix("...").strip(), f.metadata["help"]))
    return rows


def to_dict(config: ExperimentConfig) -> dict:
    return dataclasses.asdict(config)


def stored_config(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The config saved in a checkpoint written by an earlier version, each ``REPLACED_KEYS`` entry translated
    to what replaced it (a user's YAML or command line naming one is still an error):
    ``eval.reference_probe_batch_size`` B (a global batch) becomes ``reference_probe_lr_batch`` B (the lr was
    given at it) and ``reference_probe_batch_per_worker`` ceil(B / ray.num_workers) (the split it had)."""
    raw = copy.deepcopy(raw)
    evaluation = raw.get("eval") or {}
    if "reference_probe_batch_size" in evaluation:
        batch = int(evaluation.pop("reference_probe_batch_size"))
        workers = int((raw.get("ray") or {}).get("num_workers", 1)) or 1
        evaluation.setdefault("reference_probe_lr_batch", batch)
        evaluation.setdefault("reference_probe_batch_per_worker", -(-batch // workers))
    return build_config(raw, overrides)


def from_dict(raw: dict) -> ExperimentConfig:
    return build_config(raw)


def config_hash(config: ExperimentConfig) -> str:
    """A short digest of the resolved config: the same command gives the same hash."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:8]


def flatten(config: ExperimentConfig) -> dict[str, str]:
    """``{"loss.tau1": "0.1", ...}``: the resolved config as MLflow params."""
    return {key: str(value) for key, value in dotted_values(to_dict(config)).items()}


def dotted_values(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"loss.tau1": 0.1, ...}``: the leaves of nested sections under their dotted keys (lists are leaves)."""
    found: dict[str, Any] = {}
    for key, value in tree.items():
        found.update(dotted_values(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return found
