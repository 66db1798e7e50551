"""A sweep, as written in ``configs/tune/*.yaml``: the experiment it starts from, the search space, the searcher
and the scheduler. Loading checks everything before any cluster resource is touched (``ConfigError``).

    experiment: ../digits.yaml          # the experiment config every trial starts from (relative to this file)
    experiment_overrides: {optim.epochs: 3}
    tune: {name: digits-asha, searcher: optuna, scheduler: asha, num_samples: 8, ...}   (``TuneSettings``)
    space:
      loss.tau1: {type: loguniform, low: 0.05, high: 0.3}
      loss.eps:  {type: uniform, low: 0.0, high: 0.04, below: loss.tau1}   # eps < tau1 in every trial

``varcon tune`` overrides: ``tune.<key>=value`` sets a sweep setting, any other ``key=value`` an experiment value.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage
from pipeline.config import (
    REPO_ROOT,
    ConfigError,
    ExperimentConfig,
    build_config,
    build_dataclass,
    flatten,
    load_config,
    resolve_path,
    set_dotted,
    setting,
    to_dict,
    yaml_problem,
)
from pipeline.tracking import resolve_tracking_uri

DEFAULT_SWEEP = REPO_ROOT / "configs" / "tune" / "digits_asha.yaml"
SEARCHERS = ("random", "optuna", "grid")
SCHEDULERS = ("fifo", "asha", "pbt", "pb2")
PARAM_TYPES = ("uniform", "loguniform", "choice", "randint", "grid")
BELOW_MARGIN = 1.0 - 1e-3  # a `below` key stays at most 99.9% of its partner (eps < tau1 strictly)
REPLICATE = "__trial_index__"  # the replicate of a configuration (Tune's Repeater sets it): seed = seed + replicate
POPULATION_KEYS = ("loss.tau1", "loss.eps")  # what PBT/PB2 may change during training (see README)


@dataclass
class TuneSettings:
    name: str = setting("sweep", "names the Tune experiment (storage folder), the MLflow parent run, trial runs")
    searcher: str = setting("random", "random | optuna (TPE) | grid (every grid value; other keys drawn at random); "
                                      "PBT/PB2 sample their population at random")
    scheduler: str = setting("asha", "fifo | asha (early stopping) | pbt | pb2 (population-based)")
    num_samples: int = setting(8, "configurations (PBT/PB2: the population size; grid: repeats of the grid)")
    seeds: int = setting(1, "each configuration trained with seeds seed, seed+1, ...: the table reports mean +- sd")
    baseline: str = setting("", "a grid's configuration (e.g. recipe=varcon) every other one is compared with, "
                                "pair by pair over the seeds (tune.verdicts; needs tune.seeds >= 3); '' = none")
    min_gain: float = setting(0.0, "the least mean paired gain over the baseline a 'pays' verdict needs, in the "
                                   "metric's units (e.g. 0.01 = one point of top-1), declared before the sweep")
    metric: str = setting("monitor_top1", "the latest validation kNN top-1 (never a test metric), reported every epoch")
    mode: str = setting("max", "max | min: the direction of tune.metric")
    seed: int = setting(0, "searcher seed")
    max_concurrent_trials: int = setting(0, "0: as many as the cluster's CPUs (GPUs with ray.use_gpu) allow")
    trial_driver_cpus: float = setting(0.0, "CPUs for each trial's Ray Train driver process (it only coordinates)")
    max_failures: int = setting(1, "Tune-level retries of a trial whose driver died")
    grace_period: int = setting(1, "ASHA: epochs every trial gets before it may be stopped")
    reduction_factor: int = setting(2, "ASHA: keep the top 1/reduction_factor at each rung")
    perturbation_interval: int = setting(10, "PBT/PB2: epochs between exploit/explore steps; each restarts every "
                                             "trial's worker group (~43 s on GPUs, bench/trial_overhead.py): <= 10% "
                                             "of an ImageNet trial's training from 7 epochs")
    quantile_fraction: float = setting(0.25, "PBT/PB2: bottom fraction that copies the top fraction")
    resample_probability: float = setting(0.25, "PBT: chance to resample instead of perturbing by 0.8/1.2")
    mutate: list[str] = setting(factory=lambda: list(POPULATION_KEYS), help="PBT/PB2: keys changed in training")
    registered_model_name: str = setting("", "register the best trial's encoder under this name ('' = no registration)")
    output_dir: str = setting(".cache/sweeps", "<output_dir>/<name>/best_config.yaml and trials.csv")


@dataclass
class Param:
    """One search dimension over a dotted experiment key."""

    key: str
    type: str  # uniform | loguniform | choice | randint | grid (each value once: a scalar, or for a key that is
    #            no config key a mapping {name: label, dotted.key: value, ...}: a recipe)
    low: float | None = None
    high: float | None = None
    values: list[Any] = field(default_factory=list)
    below: str = ""  # keep this value below another sampled key (loss.eps below loss.tau1)


@dataclass
class SweepSpec:
    settings: TuneSettings
    experiment: dict  # raw experiment config: base file with experiment_overrides and command-line overrides
    space: list[Param]
    source: str = ""  # the YAML file it came from

    @property
    def population_based(self) -> bool:
        return self.settings.scheduler in ("pbt", "pb2")

    @functools.cached_property
    def base(self) -> ExperimentConfig:
        """The experiment every trial starts from (built once per spec)."""
        return build_config(self.experiment)

    def trial_config(self, sampled: dict, trial_id: str) -> ExperimentConfig:
        """The experiment of one trial: sampled values applied (a recipe's values expanded, the replicate's
        seed), named ``<sweep>-<trial id>`` (its Ray Train run and MLflow run key, so a resumed sweep continues
        the same trial run), evaluated only where its scheduler reads the monitor (``evaluation_epochs``) and
        checkpointed there too: the result a scheduler stops a trial on is then in its last checkpoint, so in its
        MLflow run (metrics reach MLflow with the checkpoint that covers them)."""
        name = f"{self.settings.name}-{trial_id}"
        values = {}
        for key, value in sampled.items():
            if key == REPLICATE:
                values["seed"] = self.experiment.get("seed", 0) + int(value or 0)
            elif isinstance(value, dict):
                values.update({k: v for k, v in value.items() if k != "name"})
            else:
                values[key] = value
        values.update({"name": name, "ray.run_name": name})
        if not self.experiment["eval"]["at_epochs"]:
            values["eval.at_epochs"] = self.evaluation_epochs()
        values["ray.checkpoint_at_epochs"] = sorted({*self.experiment["ray"]["checkpoint_at_epochs"],
                                                     *self.evaluation_epochs()})
        return build_config(with_values(self.experiment, values))

    def evaluation_epochs(self) -> list[int]:
        """The epochs whose validation monitor the scheduler reads: ASHA's rungs (``grace_period x
        reduction_factor^k``), PBT/PB2's perturbation epochs, FIFO none; the last epoch is evaluated anyway."""
        s, epochs = self.settings, self.experiment["optim"]["epochs"]
        if s.scheduler == "asha":
            rungs, rung = [], s.grace_period
            while rung < epochs:
                rungs.append(rung)
                rung *= s.reduction_factor
            return rungs + [epochs]
        if self.population_based:
            return list(range(s.perturbation_interval, epochs, s.perturbation_interval)) + [epochs]
        return [epochs]

    @staticmethod
    def label(value) -> str:
        """How a sampled value is shown: a recipe by its name."""
        if isinstance(value, dict):
            return str(value.get("name", value))
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    def with_absolute_paths(self) -> SweepSpec:
        """The spec with the experiment's store, caches and data folder made absolute (and the tracking URI
        resolved) on the driver: trial processes run elsewhere, with another working directory."""
        e = self.experiment
        values = {"tracking.tracking_uri": resolve_tracking_uri(e["tracking"]["tracking_uri"]),
                  "data.cache_dir": str(resolve_path(e["data"]["cache_dir"])),
                  "ray.storage_path": storage.location(e["ray"]["storage_path"]).uri}
        if e["data"]["root"]:
            values["data.root"] = str(resolve_path(e["data"]["root"]))
        settings = copy.copy(self.settings)
        settings.output_dir = storage.location(settings.output_dir).uri
        return SweepSpec(settings, with_values(e, values), self.space, self.source)

    def describe(self) -> dict[str, str]:
        """Flat params for the sweep's MLflow parent run."""
        params = {f"tune.{key}": str(value) for key, value in vars(self.settings).items()}
        params["tune.source"] = self.source
        params.update({f"space.{p.key}": json.dumps({k: v for k, v in vars(p).items() if k != "key" and v not in
                                                     (None, [], "")}) for p in self.space})
        return params


def load_sweep(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read a sweep YAML (default: configs/tune/digits_asha.yaml), apply overrides, check it."""
    path = Path(path) if path else DEFAULT_SWEEP
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist: pass one of configs/tune/*.yaml to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML ({yaml_problem(exc)}): fix the syntax") from None
    unknown = set(raw) - {"experiment", "experiment_overrides", "tune", "space"}
    if unknown or "experiment" not in raw or not isinstance(raw.get("space"), dict):
        raise ConfigError(f"sweep file {path} must hold experiment: FILE, space: {{key: {{type: ...}}}} and "
                          f"optionally experiment_overrides and tune" + (f" (unknown: {sorted(unknown)})" if unknown
                                                                         else ""))
    tune_raw, experiment_overrides = split_overrides(raw.get("tune"), overrides, "tune.")
    experiment = load_experiment(path, raw, experiment_overrides)
    return sweep_spec(tune_raw, experiment, raw["space"], str(path))


def split_overrides(settings: dict | None, overrides: list[str] | tuple[str, ...], prefix: str
                    ) -> tuple[dict, list[str]]:
    """``settings`` (a file's ``tune:`` or ``study:`` mapping) with the ``<prefix><key>=value`` overrides applied,
    and the other overrides (experiment values)."""
    settings, experiment = dict(settings or {}), []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith(prefix) and sep:
            settings[key.removeprefix(prefix)] = yaml.safe_load(value) if value.strip() else ""
        else:
            experiment.append(item)
    return settings, experiment


def load_experiment(path: Path, raw: dict, overrides: list[str]) -> dict:
    """The experiment a sweep or study file at ``path`` names (``experiment``, relative to the file), with its
    ``experiment_overrides`` and the command line's ``overrides`` applied, as a raw dict."""
    base = to_dict(load_config(path.parent / str(raw["experiment"])))
    return to_dict(build_config(with_values(base, raw.get("experiment_overrides") or {}), overrides))


def sweep_spec(tune_raw: dict, experiment: dict, space_raw: dict, source: str) -> SweepSpec:
    """A checked sweep of ``experiment`` (raw) from its ``tune`` settings and ``space`` mappings."""
    settings = build_dataclass(TuneSettings, tune_raw, "tune.")
    spec = SweepSpec(settings, experiment, [_param(key, value) for key, value in space_raw.items()], source)
    _validate(spec)
    return spec


def with_values(raw: dict, values: dict) -> dict:
    """A copy of the nested config ``raw`` with ``{dotted key: value}`` set."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        set_dotted(raw, key, value)
    return raw


def _param(key: str, raw) -> Param:
    if not isinstance(raw, dict):
        raise ConfigError(f"space.{key} must be a mapping like {{type: loguniform, low: 0.05, high: 0.5}}")
    return build_dataclass(Param, {"key": key, **raw}, f"space.{key}.")


def _validate(spec: SweepSpec) -> None:
    s = spec.settings

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(s.searcher in SEARCHERS, f"tune.searcher={s.searcher!r} is unknown: use one of {', '.join(SEARCHERS)}")
    need(s.scheduler in SCHEDULERS, f"tune.scheduler={s.scheduler!r} is unknown: use one of {', '.join(SCHEDULERS)}")
    need(s.mode in ("max", "min"), f"tune.mode={s.mode!r} must be max or min")
    need(not s.metric.startswith("test_"), f"tune.metric={s.metric} is measured on the test split, which never "
                                           f"selects: use monitor_top1 or a val_* metric")
    need(s.num_samples >= 1, f"tune.num_samples={s.num_samples} must be >= 1")
    need(s.seeds >= 1, f"tune.seeds={s.seeds} must be >= 1")
    need(spec.base.data.val_fraction > 0, "a sweep selects trials on the validation split, and "
                                          "data.val_fraction=0 leaves none: set data.val_fraction (e.g. 0.1) in "
                                          "the experiment or experiment_overrides")
    need(s.max_concurrent_trials >= 0 and s.trial_driver_cpus >= 0 and s.max_failures >= 0,
         "tune.max_concurrent_trials, tune.trial_driver_cpus and tune.max_failures must be >= 0")
    need(s.grace_period >= 1 and s.reduction_factor >= 2, "tune.grace_period must be >= 1, tune.reduction_factor >= 2")
    need(s.perturbation_interval >= 1 and 0 < s.quantile_fraction <= 0.5 and 0 <= s.resample_probability <= 1,
         "tune.perturbation_interval must be >= 1, tune.quantile_fraction in (0, 0.5], "
         "tune.resample_probability in [0, 1]")
    need(bool(spec.space), "space is empty: add at least one key to search")
    base = spec.base
    epochs = base.optim.epochs
    sampled = {p.key: p for p in spec.space}
    for p in spec.space:
        need(p.type in PARAM_TYPES, f"space.{p.key}.type={p.type!r} is unknown: use one of {', '.join(PARAM_TYPES)}")
        if p.type in ("choice", "grid"):
            need(bool(p.values), f"space.{p.key}.values must list the choices")
            need(p.type != "grid" or s.searcher == "grid", f"space.{p.key} is a grid: use tune.searcher=grid")
            need(p.type == "grid" or not any(isinstance(v, dict) for v in p.values),
                 f"space.{p.key}: only a grid's values may be recipes (mappings)")
            recipe = p.key not in flatten(base) and p.key != "seed"
            need(not recipe or all(isinstance(v, dict) and "name" in v for v in p.values),
                 f"space.{p.key} is no experiment key: a grid over it lists recipes, mappings like "
                 f"{{name: varcon, loss.name: varcon, optim.lr: 0.5}}")
        else:
            need(p.low is not None and p.high is not None and p.low < p.high,
                 f"space.{p.key} needs low < high")
            need(p.type != "loguniform" or p.low > 0, f"space.{p.key}: a loguniform range needs low > 0")
        if p.below:
            target = sampled.get(p.below)
            need(target is None or not target.below, f"space.{p.key}.below={p.below!r} names a key that is itself "
                                                     f"below {target and target.below}: one level of below only")
            need(target is not None and target.type in ("uniform", "loguniform") and p.type == "uniform",
                 f"space.{p.key}.below={p.below!r} must name another uniform/loguniform key of the space, and "
                 f"{p.key} must be uniform")
            need(p.low < target.low, f"space.{p.key}.low={p.low} must be below space.{p.below}.low={target.low} "
                                     f"so that every sample can satisfy {p.key} < {p.below}")
    loss_names = sampled["loss.name"].values if "loss.name" in sampled else [base.loss.name]
    need(set(loss_names) == {"varcon"} or not any(k.startswith("loss.schedule") for k in sampled),
         "the space searches temperature schedules (VarCon only) and loss.name choices other than varcon: "
         "split it into two sweeps")
    for corner in corners(spec.space):  # every extreme of the space must make a valid experiment
        try:
            spec.trial_config(corner, "check")
        except ConfigError as exc:
            shown = ", ".join(f"{k}={SweepSpec.label(v)}" for k, v in corner.items())
            raise ConfigError(f"the space's corner {shown} does not make a valid experiment: {exc}") from None
    need(s.searcher != "grid" or any(p.type == "grid" for p in spec.space),
         "tune.searcher=grid needs a key of type grid in the space")
    if s.baseline:
        need(s.searcher == "grid" and all(p.type == "grid" for p in spec.space),
             f"tune.baseline={s.baseline!r} compares configurations seed by seed: every key of the space must be "
             f"a grid (tune.searcher=grid), so each configuration is trained with every seed")
        need(s.seeds >= 3, f"tune.seeds={s.seeds}: a verdict against tune.baseline needs at least 3 seeds (pairs)")
        labels = grid_configurations(spec.space)
        need(s.baseline in labels, f"tune.baseline={s.baseline!r} is not a configuration of the grid: use one of "
                                   f"{', '.join(repr(label) for label in labels)}")
        need(s.min_gain >= 0, f"tune.min_gain={s.min_gain} must be >= 0")
    if spec.population_based:
        need(s.searcher == "random", f"tune.scheduler={s.scheduler} samples its population itself: use "
                                     f"tune.searcher=random")
        need(s.seeds == 1, f"tune.seeds={s.seeds}: a population shares weights between its members, so its "
                           f"replicates are not independent; repeat the sweep with other tune.seed values instead")
        need(bool(s.mutate) and set(s.mutate) <= set(POPULATION_KEYS) and set(s.mutate) <= set(sampled),
             f"tune.mutate={s.mutate} must name keys of the space among {', '.join(POPULATION_KEYS)} (the "
             f"learning rate and batch size live in the optimiser state a PBT exploit copies)")
        need(all(sampled[k].type in ("uniform", "loguniform") for k in s.mutate),
             "tune.mutate keys must be uniform or loguniform in the space")
        need(base.loss.schedule.kind == "constant" and not any(k.startswith("loss.schedule") for k in sampled),
             f"tune.scheduler={s.scheduler} discovers the temperature schedule itself: keep loss.schedule constant")
        need(not s.max_concurrent_trials or s.max_concurrent_trials >= s.num_samples,
             f"tune.max_concurrent_trials={s.max_concurrent_trials} is below the population (tune.num_samples="
             f"{s.num_samples}): a paused trial stays live, so a cap would shrink the population; drop the cap "
             f"(trials that do not fit wait and take turns) or lower tune.num_samples")
        need(s.perturbation_interval < epochs, f"tune.perturbation_interval={s.perturbation_interval} must be "
                                               f"smaller than optim.epochs={epochs}")
    if s.scheduler == "asha":
        need(s.grace_period < epochs, f"tune.grace_period={s.grace_period} must be smaller than optim.epochs="
                                      f"{epochs}, or nothing can be stopped early")


def grid_configurations(space: list[Param]) -> list[str]:
    """The configuration label (``tune.results.TrialRow.configuration``) of every point of an all-grid space."""
    grids = sorted(space, key=lambda p: p.key)
    return [", ".join(f"{p.key}={SweepSpec.label(v)}" for p, v in zip(grids, point))
            for point in itertools.product(*(p.values for p in grids))]


def corners(space: list[Param]) -> Iterator[dict]:
    """The space's extremes that must each make a valid experiment: every combination of the loss keys' and
    recipes' ends (a range's low and high, each value of a choice or grid; a ``below`` key at its low and at the
    highest value its partner allows, ``BELOW_MARGIN``), each other key's ends alone beside the first of them.
    Schedules that are possible key by key but not together (a periodic schedule's low tau1 with the largest
    eps) show here; the keys that cannot interact with them are not multiplied in."""
    def ends(p: Param) -> list:
        if p.type in ("choice", "grid"):
            return list(p.values)
        return [int(p.low), int(p.high)] if p.type == "randint" else [p.low, p.high]

    def joint(p: Param) -> bool:
        return p.key.startswith("loss.") or any(isinstance(v, dict) for v in p.values)

    crossed, alone = [p for p in space if joint(p) and not p.below], [p for p in space if not joint(p)]
    below = [p for p in space if p.below and joint(p)]
    first = {}
    for point in itertools.product(*(ends(p) for p in crossed)):
        values = dict(zip([p.key for p in crossed], point))
        for under in itertools.product(*([p.low, min(p.high, values[p.below] * BELOW_MARGIN)] for p in below)):
            corner = {**values, **dict(zip([p.key for p in below], under))}
            first = first or corner
            yield corner
    for p in alone:
        for end in ends(p):
            yield {**first, p.key: end}
