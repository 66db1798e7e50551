"""``varcon study``: run a schedule study (``tune.study_spec``) and say whether tuning the temperature paid.

In order, under one MLflow parent run (``study:<name>``) with every sweep nested in it: the searches of B, C and D
(``<name>-constant``, ``<name>-schedule``, ``<name>-population``), each arm's choice read from its search's best
trial (D: the schedule its best trial's weights went through, as a piecewise ``loss.schedule``), then one grid
sweep that retrains the four choices with fresh paired seeds (``<name>-retrain``). An interrupted study run again
resumes each sweep where it stopped. The report:

- verdicts: every arm against each baseline before it, seed by seed, on the retrainings' final validation and
  test metrics (``tune.verdicts``: 95% t-interval of the paired differences, Holm within each metric);
- gain over random initialisation: per arm and seed, the final validation monitor minus the epoch-0 monitor of
  the same run (same seed, so the same initial weights), paired the same way. An arm with no evidence of a gain
  has learned nothing its verdicts could rank, and the report says so.

Printed, and logged to the parent run (``study.yaml``, ``verdicts.*``, ``initial_gain.*``, the mean differences as
metrics) and to ``<output_dir>/<name>/``.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import storage
from pipeline.config import ConfigError, dotted_values
from pipeline.names import KIND_TAG, monitor_source
from pipeline.run_status import RunStatus
from pipeline.tracking import TrackedRun, find_or_create_run, find_run, resolve_tracking_uri
from pipeline.tracking_check import check_reachable
from pipeline.train_job import end_run
from tune.results import comparison_metrics
from tune.spec import REPLICATE, SweepSpec
from tune.study_spec import ARMS, PAPER, SEARCHED, StudySpec, label
from tune.sweep import SweepOutcome, run_sweep
from tune.verdicts import (
    PAYS,
    Paired,
    judged,
    paired,
    paired_verdicts,
    plot_differences,
    verdict_table,
    write_verdicts_csv,
)

STUDY_TAG = "varcon.study"
DIGEST_TAG = "varcon.study_digest"  # StudySpec.digest(): a re-run of the same name must be the same study
RANDOM_INIT = "random init"


class StudyFailed(Exception):
    """A search ended without a completed trial: the study has no choice for that arm."""


@dataclass
class StudyOutcome:
    parent_run_id: str
    choices: dict[str, dict]  # arm -> {dotted key: value} it was retrained with
    verdicts: list[Paired]
    gains: list[Paired]  # per arm: final validation monitor minus its epoch-0 monitor
    retraining: SweepOutcome


def choice(search: SweepSpec, chosen: dict, experiment: dict) -> dict:
    """What an arm's search chose, as ``{dotted key: value}``: the keys of the best trial's ``loss`` section and of
    the search's space whose values differ from the study's ``experiment`` (D: its discovered schedule)."""
    best, base = dotted_values(chosen), dotted_values(experiment)
    keys = [k for k in best if k.startswith("loss.")] + [p.key for p in search.space if p.key in best]
    return {k: best[k] for k in dict.fromkeys(keys) if best[k] != base.get(k)}


def initial_gains(study: StudySpec, retraining: SweepOutcome) -> list[Paired]:
    """Per arm, the paired gain of the final validation monitor over the same run's epoch-0 monitor."""
    key, found = monitor_source(study.base.eval), []
    for arm in ARMS:
        final, initial = {}, {}
        for row in retraining.rows:
            record = retraining.records.get(row.trial_id)
            if row.configuration != label(arm) or not row.status.completed or record is None:
                continue
            replicate, start = int(row.sampled.get(REPLICATE) or 0), record.at(0).get(key)
            end = record.monitor(key, study.epochs)
            if start is not None and math.isfinite(start) and math.isfinite(end):
                final[replicate], initial[replicate] = end, start
        one = paired(label(arm), RANDOM_INIT, key, final, initial)
        if one is not None:
            found.append(one)
    return judged(found, 0.0)


def learned_nothing(gains: list[Paired]) -> list[str]:
    """Lines naming each arm whose encoder shows no gain over its random initialisation."""
    weak = [g for g in gains if g.verdict != PAYS]
    if not weak:
        return []
    lines = [f"{g.configuration}: no evidence of a gain over its randomly initialised encoder ({g.metric} "
             f"{g.mean:+.4f}, 95% interval [{g.low:+.4f}, {g.high:+.4f}])" for g in weak]
    if len(weak) == len(gains):
        lines.append("no arm learned features better than random initialisation: the verdicts above rank noise")
    else:
        lines.append("verdicts involving these arms compare encoders that learned nothing measurable")
    return lines


def run_study(study: StudySpec, log=print, verbose: bool = False) -> StudyOutcome:
    s, base = study.settings, study.base
    log(study.plan())
    tracking_uri = resolve_tracking_uri(base.tracking.tracking_uri)
    check_reachable(tracking_uri, base.tracking.experiment)
    earlier, digest = find_run(tracking_uri, base.tracking.experiment, f"study:{s.name}"), study.digest()
    if earlier is not None and earlier.tags.get(DIGEST_TAG) != digest:
        raise ConfigError(f"study {s.name} ran before with other settings, spaces or experiment values (MLflow run "
                          f"{earlier.run_id}): its sweeps would resume as they were; give this one another "
                          f"study.name, or run the earlier command again")
    params = {f"study.{k}": str(v) for k, v in vars(s).items()} | {"study.source": study.source}
    parent, resumed = find_or_create_run(tracking_uri, base.tracking.experiment, f"study:{s.name}", s.name, params,
                                         tags={STUDY_TAG: s.name, KIND_TAG: "study", DIGEST_TAG: digest})
    log(f"{'resuming' if resumed else 'starting'} study {s.name} (MLflow parent run {parent.run_id})")
    try:
        choices, sources = {"paper": dict(PAPER)}, {"paper": "the paper's constant"}
        for arm in SEARCHED:
            search = study.search(arm)
            log(f"\n== arm {arm}: {search.settings.scheduler} {search.settings.name}, {s.search_trials} trials")
            found = run_sweep(search, log, verbose, parent_run_id=parent.run_id)
            if found.best is None or found.best_config is None:
                raise StudyFailed(f"the {arm} arm's search ({search.settings.name}) has no completed trial: see its "
                                  f"table above; a re-run would restore the same trials, so give the study another "
                                  f"study.name once the cause is fixed")
            choices[arm] = choice(search, found.best_config, study.experiment)
            sources[arm] = f"trial {found.best.trial_id} (MLflow run {found.best.run_id})"
            log(f"{arm} arm chooses {choices[arm]}")
        retrain = study.retraining(choices)
        log(f"\n== retraining every arm's choice with {s.seeds} seeds ({retrain.settings.name})")
        retraining = run_sweep(retrain, log, verbose, parent_run_id=parent.run_id)
        metrics = comparison_metrics(retrain)[1:]  # the final validation and test figures
        verdicts = paired_verdicts(retraining.rows, study.comparisons(), metrics, s.min_gain)
        gains = initial_gains(study, retraining)
        report(study, parent, choices, sources, verdicts, gains, log)
    except BaseException as exc:
        end_run(parent, RunStatus.failed(f"{type(exc).__name__}: {exc}"), guard=True)
        raise
    parent.end()
    return StudyOutcome(parent.run_id, choices, verdicts, gains, retraining)


def report(study: StudySpec, parent: TrackedRun, choices: dict, sources: dict, verdicts: list[Paired],
           gains: list[Paired], log) -> None:
    """Print the verdicts and the gains over random initialisation; log them with the arms' choices."""
    s = study.settings
    table = verdict_table(verdicts, s.min_gain)
    gain_table = verdict_table(gains, 0.0)
    warning = learned_nothing(gains)
    log(f"\nstudy {s.name}: paired over {s.seeds} seeds (tune.verdicts; Holm within each metric)\n{table}")
    log(f"\ngain over the randomly initialised encoder (final minus epoch-0 validation monitor, same run)\n"
        f"{gain_table}")
    for line in warning:
        log(line)
    search, retrain = study.trial_epochs()
    summary = {"study": vars(s), "trial_epochs": {"search_per_arm": search // len(SEARCHED), "retraining": retrain},
               "arms": {arm: {"choice": choices[arm], "chosen_by": sources[arm]} for arm in ARMS}}
    with tempfile.TemporaryDirectory(prefix="varcon-study-") as staged:
        staged = Path(staged)
        (staged / "study.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        (staged / "verdicts.txt").write_text(table + "\n")
        (staged / "initial_gain.txt").write_text(gain_table + "\n" + "".join(f"{line}\n" for line in warning))
        write_verdicts_csv(verdicts, staged / "verdicts.csv")
        write_verdicts_csv(gains, staged / "initial_gain.csv")
        if verdicts:
            plot_differences(verdicts, staged / "verdicts.png")
        for path in sorted(staged.iterdir()):
            parent.log_artifact(path)
        (storage.location(s.output_dir) / s.name).upload(staged)
    values = {f"{v.configuration}_minus_{v.baseline}/{v.metric}".replace("arm=", ""): v.mean for v in verdicts}
    values.update({f"gain_over_init/{g.configuration.removeprefix('arm=')}": g.mean for g in gains})
    if not any(parent.metric_history(key) for key in list(values)[:1]):  # a re-run of a finished study: logged
        parent.log_metrics(values, step=study.epochs)
