"""The function Ray Tune runs, one call per trial, whatever the scheduler (FIFO, ASHA, PBT, PB2).

``train_trial`` opens the trial's run with ``train_job.start_run`` and trains it as a Ray Train run of
``ray.num_workers`` workers (``TorchTrainer``, DDP), nested under the sweep's MLflow parent run; every epoch reaches
Tune through ``tune.train_reports`` (what ASHA stops on and PBT/PB2 perturb at), and metrics reach MLflow from the
Train run's controller as for any run. What differs between schedulers, a population trial's Tune checkpoints and its
restarts from them, is ``tune.train_reports.Handover``. A trial that trains every epoch logs its artifacts and
encoder itself (trials do that side by side), except a population trial, whose weights may have come from another
trial: the sweep driver finishes it from its checkpoints (``tune.sweep.summarise``), as it leaves every trial's final
status to that one owner of trial outcomes.

A trial whose loss became non-finite returns normally with ``diverged`` in its last result: Tune does not retry
it (the divergence would repeat), and the sweep driver records it as failed with the reason.
"""
from __future__ import annotations

from pipeline.console import queue_on_this_node
from pipeline.data.prepare import PreparedDataset
from pipeline.names import SWEEP_TAG, TRIAL_ID_TAG, monitor_source
from pipeline.ray_callbacks import TrialReportSender
from pipeline.train_job import RunPlan, finish_run, start_run, train_opened
from tune.spec import SweepSpec
from tune.train_reports import Handover, relay


def trial_tags(spec: SweepSpec, trial_id: str) -> dict[str, str]:
    return {SWEEP_TAG: spec.settings.name, TRIAL_ID_TAG: trial_id}


def train_trial(sampled: dict, spec: SweepSpec, parent_run_id: str, prepared: dict[str, PreparedDataset]) -> None:
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    config = spec.trial_config(sampled, trial_id)
    plan = RunPlan.of(config, own_checkpoints=not spec.population_based)
    opened = start_run(plan, lambda *_: None, parent_run_id, trial_tags(spec, trial_id), prepared)
    if opened.trained_every_epoch:
        # trained before a restored sweep's driver recorded it: Tune gets the final result again
        ray.tune.report(opened.latest.record.report(monitor_source(config.eval)))
        return
    given = Handover(spec.population_based, plan.storage_path)
    segment = given.segment(plan.run_key)
    reports = queue_on_this_node(1)  # the trial's node: kept, never preempted (tune.sweep.trial_resources)
    try:
        outcome = relay(lambda: train_opened(opened, lambda *_: None, callbacks=[TrialReportSender(reports)],
                                             segment=segment), reports, given.report)
    finally:
        reports.shutdown()
    if not spec.population_based and not outcome.diverged and outcome.record.trained_every_epoch(config.optim.epochs):
        finish_run(opened, outcome)
