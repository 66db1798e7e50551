"""``varcon tune``: run a sweep with Ray Tune, or resume the interrupted sweep of the same name, then report it.

The sweep is an MLflow parent run (found again by name); each trial is a child run. The driver prepares the data
once for the trials, and at the end it is the one owner of every trial's outcome (``summarise``): it finishes
each trial's MLflow run from Tune's result and the trial's checkpoints (completed, early-stopped by the
scheduler, diverged, errored), writes a table of trials, ``<output_dir>/<name>/best_config.yaml`` (a config
``varcon train --config`` accepts; for PBT/PB2 the discovered temperature schedule as a piecewise
``loss.schedule``) and registers the best encoder.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline import cluster, faults, plots, storage
from pipeline.config import ConfigError, to_dict
from pipeline.data.preflight import prepare
from pipeline.data.prepare import dataset_key
from pipeline.names import DIVERGED, EPOCH, KIND_TAG, PARENT_TAG, REGISTERED_TAG, SWEEP_TAG, TRIAL_ID_TAG
from pipeline.run_status import COMPLETED, EARLY_STOPPED, Ending, RunStatus
from pipeline.startup import driver_started
from pipeline.tracking import TrackedRun, child_runs, find_or_create_run
from pipeline.train_job import (
    OpenRun,
    RunPlan,
    checkpoints_in,
    drop_unregistered,
    end_run,
    finish_run,
    outcome_from_checkpoints,
)
from tune import analysis, space
from tune.discovered import as_piecewise, lineage_schedule
from tune.results import (
    Compared,
    TrialRow,
    best_trial,
    compare,
    comparison_metrics,
    print_trial_table,
    write_comparisons,
    write_trials_csv,
)
from tune.spec import REPLICATE, SweepSpec
from tune.train_reports import drop_other_segments, pointed_checkpoints
from tune.trainables import train_trial

# bytes a trial's Ray Train driver process reserves when it takes no CPU: its imports alone (tune.trainables,
# ray.train.torch) peak at 0.9 GiB resident (CPU torch, measured here); its Train controller (~0.2 GiB) reserves none
DRIVER_MEMORY = 1024**3


@dataclass
class SweepOutcome:
    parent_run_id: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_config_path: str | None  # a path or URI (``tune.output_dir``)
    registered: str | None
    compared: list[Compared] = field(default_factory=list)
    records: dict = field(default_factory=dict)  # trial id -> its final RunRecord (every epoch's metrics)
    best_config: dict | None = None  # the best trial's standalone experiment (best_config.yaml)


def trial_resources(spec: SweepSpec, maximum: cluster.ClusterMaximum | None = None) -> tuple[dict, float, float]:
    """Tune resources of one trial's own process (the driver of its Ray Train runs), and the CPUs and GPUs one whole
    trial occupies. Where the cluster's ``maximum`` declares ``TRIAL_DRIVER_SLOT``, a trial's driver takes one: it
    runs on a node that is never preempted."""
    r = spec.base.ray
    # Ray cannot schedule an empty request: a driver that takes no CPU reserves the memory it uses instead
    own = {"CPU": spec.settings.trial_driver_cpus} if spec.settings.trial_driver_cpus else {"memory": DRIVER_MEMORY}
    if maximum is not None and maximum.declares(cluster.TRIAL_DRIVER_SLOT):
        own[cluster.TRIAL_DRIVER_SLOT] = 1.0
    return own, spec.settings.trial_driver_cpus + r.num_workers * r.cpus_per_worker, float(r.num_workers * r.use_gpu)


def trial_bundles(spec: SweepSpec, maximum: cluster.ClusterMaximum | None = None) -> list[dict]:
    """The bundles one trial places: its own process (where it takes a CPU or a driver slot) and its Ray Train
    workers."""
    own, _, _ = trial_resources(spec, maximum)
    r = spec.base.ray
    driver = {k: float(v) for k, v in own.items() if k != "memory" and v}
    return ([driver] if driver else []) + cluster.training_bundles(r.num_workers, r.cpus_per_worker, r.use_gpu)


def concurrency(spec: SweepSpec, have: dict) -> int:
    """``tune.max_concurrent_trials``, else as many trials as the cluster's CPUs (GPUs) hold; a trial larger
    than the cluster is a ``ConfigError`` instead of a wait forever."""
    _, cpus, gpus = trial_resources(spec)
    have_cpus, have_gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus > have_cpus or gpus > have_gpus:
        raise ConfigError(f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has {have_cpus:g} "
                          f"CPUs and {have_gpus:g} GPUs: lower ray.num_workers or ray.cpus_per_worker, set "
                          f"ray.use_gpu=false, or add nodes")
    fits = [math.floor(have_cpus / cpus) if cpus else spec.settings.num_samples]
    if gpus:
        fits.append(math.floor(have_gpus / gpus))
    return spec.settings.max_concurrent_trials or max(1, min(fits))


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tune.schedulers import PB2WithinTraining, PopulationWithinTraining

    s, epochs = spec.settings, spec.base.optim.epochs
    if s.scheduler == "asha":
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t at once, which would cut off the
        # trial's own ending (final checkpoint, model logging); trials end by themselves after their last epoch
        return ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.scheduler == "pbt":
        return PopulationWithinTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                        hyperparam_mutations=space.pbt_mutations(spec),
                                        quantile_fraction=s.quantile_fraction,
                                        resample_probability=s.resample_probability,
                                        custom_explore_fn=space.ExploreWithinSpace(spec), synch=True,
                                        last_epoch=epochs)
    if s.scheduler == "pb2":
        return PB2WithinTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                 hyperparam_bounds=space.pb2_bounds(spec), quantile_fraction=s.quantile_fraction,
                                 custom_explore_fn=space.ExploreWithinSpace(spec), synch=True, last_epoch=epochs)
    return FIFOScheduler()


def _tuner(spec: SweepSpec, parent_run_id: str, max_concurrent: int, prepared: dict,
           maximum: cluster.ClusterMaximum | None):
    """A new ``Tuner``, or the interrupted one restored from its storage folder (no finished trial repeats)."""
    from ray import tune

    s, base = spec.settings, spec.base
    own, _, _ = trial_resources(spec, maximum)
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=spec, parent_run_id=parent_run_id,
                                                         prepared=prepared), own)
    place = storage.location(base.ray.storage_path)
    path = place / s.name
    if tune.Tuner.can_restore(path.uri):
        return tune.Tuner.restore(path.uri, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False), True
    search = None if spec.population_based else space.searcher(spec)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(spec),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search, scheduler=_scheduler(spec),
                                    num_samples=space.trial_count(spec), max_concurrent_trials=max_concurrent,
                                    trial_name_creator=TrialNames(spec)),
        run_config=tune.RunConfig(name=s.name, storage_path=place.uri, progress_reporter=_reporter(spec), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                  callbacks=faults.sweep_callbacks()),
    ), False


class TrialNames:
    """Tune's trial names: each grid or choice value by its label (a recipe by its name), the replicate, then
    Tune's trial id: ``varcon_r1_4b40a_00002`` where Tune would write ``train_trial_4b40a_00002``."""

    def __init__(self, spec: SweepSpec) -> None:
        self.keys = [p.key for p in spec.space if p.type in ("grid", "choice")]

    def __call__(self, trial) -> str:
        config = trial.config
        parts = [SweepSpec.label(config[key]) for key in self.keys if key in config]
        if REPLICATE in config:
            parts.append(f"r{config[REPLICATE]}")
        return "_".join([re.sub(r"[^\w.+-]+", "-", part) for part in parts] + [trial.trial_id])


def parameter_columns(spec: SweepSpec) -> dict[str, str]:
    """The live table's parameter columns, ``{lookup key: header}``: a recipe by its name (Tune looks
    ``recipe/name`` up inside the sampled mapping), every other key by its value, and the replicate."""
    columns = {}
    for p in spec.space:
        recipe = any(isinstance(v, dict) for v in p.values or [])
        columns[f"{p.key}/name" if recipe else p.key] = p.key.split(".")[-1]
    if spec.settings.seeds > 1 and not spec.population_based:
        columns[REPLICATE] = "replicate"
    return columns


def _reporter(spec: SweepSpec):
    """Tune's live table with chosen columns: trial (and status), the sampled values, epoch and the monitor,
    best first. It is Tune's classic reporter (``RAY_AIR_NEW_OUTPUT=0``), the one that takes columns."""
    from ray.tune import CLIReporter

    s = spec.settings
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return CLIReporter(parameter_columns=parameter_columns(spec),
                       metric_columns={EPOCH: "epoch", s.metric: s.metric}, max_report_frequency=30,
                       sort_by_metric=True, max_progress_rows=32, max_error_rows=8,
                       print_intermediate_tables=True)


def run_sweep(spec: SweepSpec, log=print, verbose: bool = False, parent_run_id: str = "") -> SweepOutcome:
    """Run (or resume) the sweep; its MLflow run is nested under ``parent_run_id`` where given (a study's)."""
    spec = spec.with_absolute_paths()
    s, base = spec.settings, spec.base
    tracking_uri = base.tracking.tracking_uri
    maximum = cluster.cluster_maximum(base.ray.autoscaler_config)
    trial = trial_bundles(spec, maximum)
    side_by_side = cluster.trials_that_fit(maximum, trial, s.max_concurrent_trials or space.trial_count(spec))
    with driver_started(base, trial * side_by_side, trial, log, verbose, {"tune.output_dir": s.output_dir}
                        ) as (data, have):
        fits = side_by_side if maximum is not None else concurrency(spec, have)
        # Tune's cap on live trials: as many as fit side by side, except for a population scheduler, whose whole
        # population must exist (a paused trial is live: a cap would shrink the population to what fits); the trials
        # that do not fit wait, and synchronous PBT/PB2 let them take turns up to each perturbation
        max_concurrent = s.num_samples if spec.population_based else fits
        prepared = {dataset_key(base.data): data}  # once, before trials start
        nested = {PARENT_TAG: parent_run_id} if parent_run_id else {}
        parent, resumed = find_or_create_run(tracking_uri, base.tracking.experiment, f"sweep:{s.name}", s.name,
                                             spec.describe(), tags={SWEEP_TAG: s.name, KIND_TAG: "sweep", **nested})
        tuner, restored = _tuner(spec, parent.run_id, max_concurrent, prepared, maximum)
        log(f"{'resuming' if restored else 'starting'} sweep {s.name}: {s.num_samples} trials, searcher "
            f"{s.searcher}, scheduler {s.scheduler}, up to {fits} at a time (MLflow parent run "
            f"{parent.run_id})")
        results = tuner.fit()
    return summarise(spec, results, parent, prepared, log)


def summarise(spec: SweepSpec, results, parent: TrackedRun, prepared: dict, log=print) -> SweepOutcome:
    """Finish every trial's MLflow run (the one place that sets a trial's final status), then the trial table,
    PBT outcomes, the best config YAML, registration and the parent run's metrics."""
    s, base = spec.settings, spec.base
    epochs = base.optim.epochs
    runs = {run.data.tags.get(TRIAL_ID_TAG): run for run in child_runs(parent.tracking_uri, parent.run_id)}
    rows, records = [], {}
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        sampled = {key: result.config.get(key) for key in [p.key for p in spec.space] + [REPLICATE]
                   if key in result.config}
        done = metrics.get(EPOCH, 0)
        diverged = metrics.get(DIVERGED, "")
        status = (RunStatus.failed(f"diverged: {diverged}") if diverged else RunStatus.failed(_error_line(result.error))
                  if result.error else COMPLETED if done >= epochs else EARLY_STOPPED)
        run = runs.get(trial_id)
        rows.append(TrialRow(trial_id, sampled, done, metrics.get(s.metric, float("nan")), status,
                             run.info.run_id if run else "", dict(metrics)))
        if run is not None:
            records[trial_id] = _finish_trial(spec, result, trial_id, run.info.run_id, status, prepared)
    compared = compare(rows, comparison_metrics(spec))
    best = best_trial(compared, s.metric, s.mode)
    print_trial_table(rows, s.metric, best, log)
    out = storage.location(s.output_dir) / s.name
    best_path, registered, chosen = None, None, None
    with tempfile.TemporaryDirectory(prefix="varcon-sweep-") as staged:
        staged = Path(staged)
        write_trials_csv(rows, staged / "trials.csv")
        write_comparisons(spec, rows, compared, staged, log)
        if best is not None:
            chosen = best_config(spec, best, records[best.trial_id])
            (staged / "best_config.yaml").write_text(yaml.safe_dump(chosen, sort_keys=False))
            best_path = (out / "best_config.yaml").uri
        for name in sorted(p.name for p in staged.iterdir()):
            parent.log_artifact(staged / name)
        (staged / "analysis").mkdir()
        log("\n" + analysis.write_analysis(spec, rows, records, staged / "analysis").table().rstrip())
        parent.log_artifacts(staged / "analysis", "analysis")
        out.upload(staged)  # a local or shared folder, or the bucket
    if best is not None:
        parent.log_metrics({f"best_{s.metric}": best.metric}, step=epochs)
        tags = parent.tags()
        if s.registered_model_name and REGISTERED_TAG not in tags:
            version = TrackedRun(parent.tracking_uri, best.run_id).register_model(s.registered_model_name)
            registered = f"{s.registered_model_name}/{version}"
            parent.set_tags({REGISTERED_TAG: registered})
        registered = registered or tags.get(REGISTERED_TAG)
        parent.set_tags({"varcon.best_run_id": best.run_id, "varcon.best_trial_id": best.trial_id})
    counts = {ending.value: sum(r.status.ending is ending for r in rows) for ending in Ending}
    parent.log_metrics({f"trials_{k.replace('-', '_')}": v for k, v in counts.items()}, step=0)
    parent.end()
    return SweepOutcome(parent.run_id, rows, best, best_path, registered, compared, records, chosen)


def _finish_trial(spec: SweepSpec, result, trial_id: str, run_id: str, status: RunStatus, prepared: dict):
    """End one trial's MLflow run from its checkpoints: the trial's Ray Train run folder, or for PBT/PB2 the
    checkpoints Tune kept. A completed trial gets its artifacts and encoder (if the trial could not log them
    itself) and, for PBT/PB2, the discovered schedule as a plot and a replayable YAML. Returns its final record."""
    config = spec.trial_config({key: result.config[key] for key in [p.key for p in spec.space] + [REPLICATE]
                                if key in result.config}, trial_id)
    plan = RunPlan.of(config, own_checkpoints=not spec.population_based)
    data = prepared.get(dataset_key(config.data)) or prepare(config, log=lambda *_: None)
    opened = OpenRun(plan, data, TrackedRun(plan.tracking_uri, run_id), None)
    if spec.population_based:  # the Train checkpoints that the Tune checkpoints Tune kept name (the last few)
        kept = pointed_checkpoints(result)
        drop_other_segments(plan, kept)
    else:
        registered = checkpoints_in(plan.run_folder, epochs_only=False)
        drop_unregistered(plan.run_folder, registered)  # a stopped trial's upload that was in flight
        kept = [c for c in registered if not c.mid_epoch]
    outcome = outcome_from_checkpoints(opened, (result.metrics or {}).get(DIVERGED, ""), kept)
    for earlier in kept[:-1]:  # a PBT trial's own epochs before an exploit are only in its own earlier records
        if earlier.record.run_id == run_id:  # sent again: the store keeps one row per (key, step, time, value)
            opened.run.log_entries(earlier.record.own_entries())
    completed = status.completed
    finish_run(opened, outcome, completed=completed)
    if completed and spec.population_based:
        lineage = lineage_schedule(outcome.record)
        with tempfile.TemporaryDirectory() as folder:
            history = {"tau1": [(e, t) for e, t, _ in lineage], "eps": [(e, v) for e, _, v in lineage]}
            plots.temperature_plot(history, Path(folder) / "discovered_schedule.png")
            (Path(folder) / "discovered_schedule.yaml").write_text(
                yaml.safe_dump({"loss": {"schedule": as_piecewise(lineage)}}, sort_keys=False))
            opened.run.log_artifacts(folder, "plots")
    end_run(opened.run, status)
    return outcome.record


def _error_line(error: BaseException) -> str:
    """``Type: message`` of a trial's own exception (Ray wraps it in a ``RayTaskError`` with a traceback)."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0]}"[:300]


def best_config(spec: SweepSpec, best: TrialRow, record) -> dict:
    """The best trial's experiment as a standalone config: its sampled values; for PBT/PB2 the schedule its
    weights went through (from its final ``record``); the base config's seed, evaluation and worker count; a
    fresh run name."""
    config = to_dict(spec.trial_config(best.sampled, best.trial_id))
    base = spec.base
    config["name"] = f"{spec.settings.name}-best"
    config["seed"], config["eval"] = base.seed, to_dict(base)["eval"]
    config["ray"].update(run_name="", num_workers=base.ray.num_workers, checkpoint_every=base.ray.checkpoint_every,
                         checkpoint_at_epochs=base.ray.checkpoint_at_epochs)
    if spec.population_based:
        schedule = as_piecewise(lineage_schedule(record))
        config["loss"]["schedule"] = {**config["loss"]["schedule"], **schedule}
        config["loss"]["tau1"], config["loss"]["eps"] = schedule["tau1_values"][0], schedule["eps_values"][0]
    return config
