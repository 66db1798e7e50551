"""``varcon tune``: run a sweep with Ray Tune, or resume the interrupted sweep of the same name, then report it.

The sweep is an MLflow parent run (found again by name); each trial is a child run. At the end: a table of
trials, ``<output_dir>/<name>/best_config.yaml`` (a config ``varcon train --config`` accepts; for PBT/PB2 the
discovered temperature schedule as a piecewise ``loss.schedule``) and the best encoder registered.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune import Callback

from pipeline.config import ConfigError, resolve_path, to_dict
from pipeline.tracking import ERROR_TAG, TrackedRun, check_reachable, child_runs
from pipeline.train_job import REGISTERED_TAG
from tune.spec import SweepSpec

STOPPED_TAG = "varcon.stopped_early"
DRIVER_MEMORY = 512 * 1024**2  # bytes a trial's Ray Train driver process reserves when it takes no CPU


@dataclass
class TrialRow:
    trial_id: str
    sampled: dict
    epochs: int
    metric: float
    status: str  # completed | stopped early | error: ...
    run_id: str = ""


@dataclass
class SweepOutcome:
    parent_run_id: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_config_path: Path | None
    registered: str | None


def trial_resources(spec: SweepSpec) -> tuple[dict, float, float]:
    """Tune resources of one trial's own process, and the CPUs and GPUs one whole trial occupies."""
    r = spec.base_config().ray
    if spec.population_based:  # the trial process trains itself
        own = {"CPU": r.cpus_per_worker, "GPU": int(r.use_gpu)}
        return own, r.cpus_per_worker, float(r.use_gpu)
    # Ray cannot schedule an empty request: a driver that takes no CPU reserves the memory it uses instead
    own = {"CPU": spec.settings.trial_driver_cpus} if spec.settings.trial_driver_cpus else {"memory": DRIVER_MEMORY}
    return own, spec.settings.trial_driver_cpus + r.num_workers * r.cpus_per_worker, float(r.num_workers * r.use_gpu)


def concurrency(spec: SweepSpec, cluster: dict) -> int:
    """``tune.max_concurrent_trials``, else as many trials as the cluster's CPUs (GPUs) hold; a trial larger
    than the cluster is a ``ConfigError`` instead of a wait forever."""
    _, cpus, gpus = trial_resources(spec)
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus > have_cpus or gpus > have_gpus:
        raise ConfigError(f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has {have_cpus:g} "
                          f"CPUs and {have_gpus:g} GPUs: lower ray.num_workers or ray.cpus_per_worker, set "
                          f"ray.use_gpu=false, or add nodes")
    fits = [math.floor(have_cpus / cpus) if cpus else spec.settings.num_samples]
    if gpus:
        fits.append(math.floor(have_gpus / gpus))
    return spec.settings.max_concurrent_trials or max(1, min(fits))


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    from tune import space

    s, epochs = spec.settings, spec.base_config().optim.epochs
    if s.scheduler == "asha":
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t at once, which would cut off the
        # trial's own ending (final checkpoint, model logging); trials end by themselves after their last epoch
        return ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=space.pbt_mutations(spec),
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability,
                                       custom_explore_fn=space.ExploreWithinSpace(spec), synch=True)
    if s.scheduler == "pb2":
        return PB2(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                   hyperparam_bounds=space.pb2_bounds(spec), quantile_fraction=s.quantile_fraction,
                   custom_explore_fn=space.ExploreWithinSpace(spec), synch=True)
    return FIFOScheduler()


class ExitAfterTrials(Callback):
    """Test hook: with ``VARCON_TEST_EXIT_AFTER_TRIALS=n`` in the driver's environment, the sweep driver dies (exit
    code 3) once n trials have completed, as with a lost head node or a killed job. Read at call time, so a
    restored sweep (which restores this callback too) runs on when the variable is gone."""

    def __init__(self) -> None:
        self.completed = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1
        after = os.environ.get("VARCON_TEST_EXIT_AFTER_TRIALS")
        if after and self.completed >= int(after):
            os._exit(3)


def _tuner(spec: SweepSpec, parent_run_id: str, max_concurrent: int):
    """A new ``Tuner``, or the interrupted one restored from its storage folder (no finished trial repeats)."""
    from ray import tune

    from pipeline.ray_train import test_hooks_from_env
    from tune import space
    from tune.trainables import population_trial, train_trial

    s = spec.settings
    own, _, _ = trial_resources(spec)
    function = population_trial if spec.population_based else train_trial
    hooks = test_hooks_from_env()  # trials do not see the driver's environment
    trainable = tune.with_resources(tune.with_parameters(function, spec=spec, parent_run_id=parent_run_id,
                                                         test_hooks=hooks), own)
    storage = resolve_path(spec.base_config().ray.storage_path)
    path = storage / s.name
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False), True
    search = None if spec.population_based else space.searcher(spec)
    return tune.Tuner(
        trainable,
        param_space=space.population_param_space(spec) if spec.population_based else None,
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search, scheduler=_scheduler(spec),
                                    num_samples=s.num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=s.name, storage_path=str(storage),
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                  callbacks=[ExitAfterTrials()]),
    ), False


def run_sweep(spec: SweepSpec, log=print) -> SweepOutcome:
    from pipeline.ray_train import init_ray, require_resources
    from pipeline.train_job import prepare

    spec = spec.with_absolute_paths()
    s = spec.settings
    base = spec.base_config()
    tracking_uri = base.tracking.tracking_uri
    check_reachable(tracking_uri)
    init_ray()
    _, cpus, gpus = trial_resources(spec)
    cluster = require_resources(cpus, gpus, base.ray.resource_wait_s, log)
    max_concurrent = concurrency(spec, cluster)
    prepare(base, log)  # once, before trials start side by side
    parent, resumed = TrackedRun.find_or_create(tracking_uri, base.tracking.experiment, f"sweep:{s.name}", s.name,
                                                spec.describe(), tags={"varcon.sweep": s.name,
                                                                       "varcon.kind": "sweep"})
    tuner, restored = _tuner(spec, parent.run_id, max_concurrent)
    log(f"{'resuming' if restored else 'starting'} sweep {s.name}: {s.num_samples} trials, searcher {s.searcher}, "
        f"scheduler {s.scheduler}, up to {max_concurrent} at a time (MLflow parent run {parent.run_id})")
    results = tuner.fit()
    return summarise(spec, results, parent, log)


def summarise(spec: SweepSpec, results, parent: TrackedRun, log=print) -> SweepOutcome:
    """Trial table, MLflow run statuses, PBT outcomes, best config YAML, registration, parent run metrics."""
    s, base = spec.settings, spec.base_config()
    epochs = base.optim.epochs
    runs = {run.data.tags.get("varcon.trial_id"): run for run in child_runs(parent.tracking_uri, parent.run_id)}
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        sampled = {p.key: result.config.get(p.key) for p in spec.space}
        done = metrics.get("epoch", 0)
        status = (f"error: {_error_line(result.error)}" if result.error else
                  "completed" if done >= epochs else "stopped early")
        run = runs.get(trial_id)
        row = TrialRow(trial_id, sampled, done, metrics.get(s.metric, float("nan")), status,
                       run.info.run_id if run else "")
        rows.append(row)
        if run is None:
            continue
        tracked = TrackedRun(parent.tracking_uri, run.info.run_id)
        if status == "stopped early" and run.info.status != "KILLED":
            # the scheduler's stop; the trial's teardown may have ended the run FAILED first (its Ray Train
            # controller dies with it, and train() records that as an error)
            if ERROR_TAG in run.data.tags:
                tracked.delete_tag(ERROR_TAG)
            tracked.set_tags({STOPPED_TAG: "true"})
            tracked.end("KILLED")
        elif status == "completed" and run.info.status == "RUNNING":
            _finish_trial(spec, result, trial_id, tracked)
    completed = [r for r in rows if r.status == "completed" and r.run_id and not math.isnan(r.metric)]
    best = (max if s.mode == "max" else min)(completed, key=lambda r: r.metric) if completed else None
    _print_table(rows, s.metric, best, log)
    out = resolve_path(s.output_dir) / s.name
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "trials.csv")
    parent.log_artifact(out / "trials.csv")
    best_path, registered = None, None
    if best is not None:
        best_path = out / "best_config.yaml"
        best_path.write_text(yaml.safe_dump(best_config(spec, best, parent.tracking_uri), sort_keys=False))
        parent.log_artifact(best_path)
        parent.log_metrics({f"best_{s.metric}": best.metric}, step=epochs)
        tags = parent.tags()
        if s.registered_model_name and REGISTERED_TAG not in tags:
            version = TrackedRun(parent.tracking_uri, best.run_id).register_model(s.registered_model_name)
            registered = f"{s.registered_model_name}/{version}"
            parent.set_tags({REGISTERED_TAG: registered})
        registered = registered or tags.get(REGISTERED_TAG)
        parent.set_tags({"varcon.best_run_id": best.run_id, "varcon.best_trial_id": best.trial_id})
    counts = {status: sum(r.status.startswith(status) for r in rows) for status in ("completed", "stopped", "error")}
    parent.log_metrics({f"trials_{k}": v for k, v in counts.items()}, step=0)
    parent.end()
    return SweepOutcome(parent.run_id, rows, best, best_path, registered)


def _error_line(error: BaseException) -> str:
    """``Type: message`` of a trial's own exception (Ray wraps it in a ``RayTaskError`` with a traceback)."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0]}"[:300]


def _finish_trial(spec: SweepSpec, result, trial_id: str, tracked: TrackedRun) -> None:
    """``train_job.record_outcome`` for a trial that trained every epoch but whose process ended first: a
    PBT/PB2 trial (its checkpoints are Tune's), or a Ray Train trial that the scheduler stopped at its last
    report. PBT/PB2 trials also get the discovered schedule as a plot and a replayable YAML."""
    from pipeline import plots
    from pipeline.train_job import TrainOutcome, prepare, record_outcome, state_paths
    from tune.discovered import as_piecewise, lineage_schedule

    config = spec.trial_config({p.key: result.config[p.key] for p in spec.space}, trial_id)
    files = prepare(config, log=lambda *_: None)
    # a Ray Train trial's last checkpoint path arrives as a metric through TuneReportCallback
    final, best = state_paths(result, result.metrics.get("checkpoint_path"))
    if spec.population_based:
        lineage = lineage_schedule(tracked.tracking_uri, tracked.run_id)
        with tempfile.TemporaryDirectory() as plot_folder:
            history = {"tau1": [(e, t) for e, t, _ in lineage], "eps": [(e, v) for e, _, v in lineage]}
            plots.temperature_plot(history, Path(plot_folder) / "discovered_schedule.png")
            (Path(plot_folder) / "discovered_schedule.yaml").write_text(
                yaml.safe_dump({"loss": {"schedule": as_piecewise(lineage)}}, sort_keys=False))
            tracked.log_artifacts(plot_folder, "plots")
    record_outcome(config, files, tracked, TrainOutcome(tracked.run_id, tracked.tracking_uri, dict(result.metrics),
                                                        {}, final, best))


def best_config(spec: SweepSpec, best: TrialRow, tracking_uri: str) -> dict:
    """The best trial's experiment as a standalone config: its sampled values; for PBT/PB2 the schedule its
    weights went through; the base config's worker count; a fresh run name."""
    config = to_dict(spec.trial_config(best.sampled, best.trial_id))
    base = spec.base_config()
    config["name"] = f"{spec.settings.name}-best"
    config["ray"].update(run_name="", num_workers=base.ray.num_workers, checkpoint_every=base.ray.checkpoint_every)
    if spec.population_based:
        from tune.discovered import as_piecewise, lineage_schedule

        schedule = as_piecewise(lineage_schedule(tracking_uri, best.run_id))
        config["loss"]["schedule"] = {**config["loss"]["schedule"], **schedule}
        config["loss"]["tau1"], config["loss"]["eps"] = schedule["tau1_values"][0], schedule["eps_values"][0]
    return config


def _print_table(rows: list[TrialRow], metric: str, best: TrialRow | None, log) -> None:
    keys = sorted({k for r in rows for k in r.sampled})
    header = ["trial", *keys, "epochs", metric, "status"]
    lines = [header]
    for r in sorted(rows, key=lambda r: r.trial_id):
        values = [f"{r.sampled[k]:.4g}" if isinstance(r.sampled.get(k), float) else str(r.sampled.get(k))
                  for k in keys]
        lines.append([r.trial_id + (" *" if r is best else ""), *values, str(r.epochs), f"{r.metric:.4f}", r.status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        log("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def _write_csv(rows: list[TrialRow], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.sampled})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial_id", *keys, "epochs", "metric", "status", "mlflow_run_id"])
        for r in rows:
            writer.writerow([r.trial_id, *(r.sampled.get(k) for k in keys), r.epochs, r.metric, r.status, r.run_id])
