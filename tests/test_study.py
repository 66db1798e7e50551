"""The schedule study's plan and report without Ray (tune.study_spec, tune.study): the sweeps it runs, equal search
budgets, the test split left to the retrainings, each arm's choice, the verdict families and the gain over the
randomly initialised encoder on fixed numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from scipy import stats

from pipeline.config import REPO_ROOT, ConfigError
from pipeline.record import RunRecord
from pipeline.run_status import COMPLETED, RunStatus
from tune.results import TrialRow
from tune.spec import REPLICATE
from tune.study import choice, initial_gains, learned_nothing
from tune.study_spec import ARMS, PAPER, SEARCHED, label, load_study
from tune.sweep import SweepOutcome
from tune.verdicts import HURTS, NO_EVIDENCE, PAYS, paired_verdicts

STUDIES = sorted((REPO_ROOT / "configs" / "study").glob("*.yaml"))
CI_STUDY = REPO_ROOT / "configs" / "study" / "digits_ci.yaml"


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_searched_arm_gets_the_same_trial_epochs_and_reads_no_test_split(path):
    study = load_study(path)
    s, epochs = study.settings, study.epochs
    budgets = []
    for arm in SEARCHED:
        search = study.search(arm)
        trial = search.trial_config({}, "t")
        assert trial.eval.final_split == "val" and trial.eval.test_every_epochs == 0
        assert trial.eval.linear_probe_epochs == 0 and trial.eval.few_shot_episodes == 0
        assert search.settings.seeds == 1 and search.base.seed == study.base.seed
        assert search.settings.scheduler == ("pbt" if arm == "population" else "fifo")  # FIFO stops no trial
        budgets.append(search.settings.num_samples * search.base.optim.epochs)
    assert budgets == [s.search_trials * epochs] * 3
    retrain = study.retraining({arm: PAPER for arm in ARMS})
    assert retrain.settings.searcher == "grid" and retrain.settings.seeds == s.seeds >= 3
    seeds = {retrain.trial_config({"arm": {"name": "paper", **PAPER}, REPLICATE: r}, "t").seed for r in range(3)}
    assert seeds == {study.base.seed + 1, study.base.seed + 2, study.base.seed + 3}  # none the searches trained with
    assert retrain.base.eval.final_split == "test"
    assert study.comparisons() == [("arm=constant", "arm=paper"), ("arm=schedule", "arm=paper"),
                                   ("arm=population", "arm=paper"), ("arm=schedule", "arm=constant"),
                                   ("arm=population", "arm=constant")]


def test_the_plan_states_trial_epochs_and_gpu_hours_before_anything_runs():
    plan = load_study(CI_STUDY).plan()
    assert "3 arms x 2 trials x 2 epochs = 12 trial-epochs" in plan and "4 arms x 3 seeds x 2 epochs = 24" in plan
    assert "estimated GPU-hours: 0 (ray.use_gpu=false: 36 trial-epochs on CPUs)" in plan
    gpu = load_study(CI_STUDY, ["ray.use_gpu=true", "study.gpu_seconds_per_epoch=600"]).plan()
    assert "estimated GPU-hours: 6.0 (36 trial-epochs x 600 GPU-s per trial-epoch" in gpu
    assert "unknown" in load_study(CI_STUDY, ["ray.use_gpu=true"]).plan()


def test_the_cifar100_study_runs_four_gpu_trials_with_a_validation_split():
    study = load_study(REPO_ROOT / "configs" / "study" / "cifar100_resnet50.yaml")
    assert study.base.ray.use_gpu and study.base.ray.num_workers == 4 and study.base.data.val_fraction > 0
    assert study.settings.gpu_seconds_per_epoch > 0 and "estimated GPU-hours: " in study.plan()


@pytest.mark.parametrize("overrides, message", [
    (["data.val_fraction=0"], "data.val_fraction=0 leaves none"),
    (["study.seeds=2"], "study.seeds=2: a verdict needs at least 3 seeds"),
    (["study.baselines=[paper, sgd]"], "study.baselines=['paper', 'sgd'] must name arms"),
    (["study.baselines=[population]"], "must name arms (once each) among paper, constant, schedule"),
    (["loss.name=supcon"], "a study tunes VarCon's temperature"),
    (["eval.initial_fraction=0.5"], "set eval.initial_fraction=1"),
    (["study.search_trials=1"], "PBT needs a population"),
])
def test_a_study_that_cannot_give_its_verdicts_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_study(CI_STUDY, overrides)


def study_file(folder, change) -> str:
    """The CI study written to ``folder/study.yaml`` after ``change(raw)`` (its experiment an absolute path)."""
    raw = yaml.safe_load(CI_STUDY.read_text())
    raw["experiment"] = str(REPO_ROOT / "configs" / "digits.yaml")
    change(raw)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def impossible_periodic(raw: dict) -> None:
    """Each key's bounds are fine alone; the low tau1 with the largest eps leaves tau1 - eps < 0.02."""
    raw["schedule"]["loss.eps"]["high"] = 0.04


def test_an_impossible_periodic_schedule_in_the_space_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"schedule arm: the space's corner loss.schedule.kind=periodic.*tau1 - eps "
                                          r"must stay >= 0.02"):
        load_study(study_file(tmp_path, impossible_periodic))


def test_an_arm_space_holds_temperature_keys_only(tmp_path):
    def with_lr(raw):
        raw["constant"]["optim.lr"] = {"type": "loguniform", "low": 0.1, "high": 1.0}

    with pytest.raises(ConfigError, match="the constant arm's space holds optim.lr: a study compares ways of "
                                          "choosing the temperature"):
        load_study(study_file(tmp_path, with_lr))


def test_a_below_key_under_another_below_key_is_one_line(tmp_path):
    def chained(raw):
        raw["schedule"]["loss.schedule.tau1_end"] = {"type": "uniform", "low": 0.0, "high": 0.3, "below": "loss.eps"}

    with pytest.raises(ConfigError, match="names a key that is itself below loss.tau1: one level of below only"):
        load_study(study_file(tmp_path, chained))


def test_a_study_run_again_with_other_settings_is_refused_before_ray_starts(varcon_home, capsys):
    """The study run of the name records what the study was; another study of that name would resume its sweeps as
    they were (their spaces, their seeds), so it is refused in one line, before Ray starts or a run is written."""
    from pipeline.cli import main
    from pipeline.tracking import create_run, resolve_tracking_uri
    from tune.study import DIGEST_TAG, STUDY_TAG

    study = load_study(CI_STUDY)
    uri = resolve_tracking_uri(study.base.tracking.tracking_uri)
    create_run(uri, study.base.tracking.experiment, f"study:{study.settings.name}", study.settings.name, {},
               tags={STUDY_TAG: study.settings.name, DIGEST_TAG: load_study(CI_STUDY, ["study.seeds=4"]).digest()})
    capsys.readouterr()
    assert main(["study", "--config", str(CI_STUDY)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varcon: error: study digits-study-ci ran before with other settings") and len(
        err.splitlines()) == 1
    assert not (varcon_home / ".cache" / "ray_results").exists()  # no sweep started


def test_an_arm_chooses_what_its_best_trial_changed():
    study = load_study(CI_STUDY)
    best = yaml.safe_load(yaml.safe_dump(study.experiment))
    best["loss"].update(tau1=0.13, eps=0.011)
    best["loss"]["schedule"].update(kind="piecewise", epochs=[1, 2], tau1_values=[0.13, 0.2], eps_values=[0.011, 0.01])
    best["ray"]["num_workers"], best["name"] = 2, "other"  # not the arm's choice: the study's experiment decides
    chosen = choice(study.search("population"), best, study.experiment)
    assert chosen == {"loss.tau1": 0.13, "loss.eps": 0.011, "loss.schedule.kind": "piecewise",
                      "loss.schedule.epochs": [1, 2], "loss.schedule.tau1_values": [0.13, 0.2],
                      "loss.schedule.eps_values": [0.011, 0.01]}
    retrain = study.retraining({**{arm: PAPER for arm in ARMS}, "population": chosen})
    replayed = retrain.trial_config({"arm": {"name": "population", **chosen}, REPLICATE: 0}, "t")
    assert replayed.loss.schedule.tau1_values == [0.13, 0.2] and replayed.ray.num_workers == 1


def arm_rows(values: dict[str, list[tuple[float, float]]]) -> SweepOutcome:
    """Retraining rows and records: per arm and replicate, (epoch-0 monitor, final monitor) over 2 epochs."""
    rows, records = [], {}
    for arm, per_seed in values.items():
        for replicate, (start, end) in enumerate(per_seed):
            trial_id = f"{arm}{replicate}"
            final = {"val_knn_top1_k20": end, "test_knn_top1_k20": end - 0.01}
            rows.append(TrialRow(trial_id, {"arm": {"name": arm}, REPLICATE: replicate}, 2, end, COMPLETED,
                                 final=final))
            records[trial_id] = RunRecord(run_id=trial_id, run_key=trial_id, identity="", epoch=2, entries=[
                [0, "val_knn_top1_k20", start, 0], [1, "val_knn_top1_k20", (start + end) / 2, 0],
                [2, "val_knn_top1_k20", end, 0]])
    return SweepOutcome("p", rows, None, None, None, records=records)


def test_the_gain_over_random_init_pairs_each_run_with_its_own_epoch_0_monitor():
    study = load_study(CI_STUDY)
    outcome = arm_rows({"paper": [(0.50, 0.90), (0.52, 0.91), (0.49, 0.88)],
                        "constant": [(0.50, 0.93), (0.52, 0.95), (0.49, 0.90)],
                        "schedule": [(0.80, 0.81), (0.82, 0.80), (0.79, 0.80)],  # no better than at the start
                        "population": [(0.50, 0.92), (0.52, 0.90), (0.49, 0.91)]})
    outcome.rows[-1].status = RunStatus.failed("boom")  # population's replicate 2: no pair
    gains = {g.configuration: g for g in initial_gains(study, outcome)}
    assert list(gains) == [label(arm) for arm in ARMS]
    paper = gains["arm=paper"]
    assert paper.differences == pytest.approx((0.40, 0.39, 0.39)) and paper.baseline == "random init"
    ends, starts = np.array([0.90, 0.91, 0.88]), np.array([0.50, 0.52, 0.49])
    assert (paper.low, paper.high) == pytest.approx(stats.t.interval(0.95, 2, loc=0.39333333,
                                                                      scale=stats.sem(ends - starts)))
    assert paper.p == pytest.approx(stats.ttest_rel(ends, starts).pvalue)
    assert gains["arm=population"].replicates == (0, 1)
    assert gains["arm=paper"].verdict == PAYS and gains["arm=schedule"].verdict == NO_EVIDENCE
    lines = learned_nothing(list(gains.values()))
    assert lines[0].startswith("arm=schedule: no evidence of a gain over its randomly initialised encoder")
    assert "learned nothing measurable" in lines[-1]
    alike = arm_rows({arm: [(0.8, 0.81), (0.8, 0.79), (0.8, 0.8)] for arm in ARMS})
    assert learned_nothing(initial_gains(study, alike))[-1].endswith("the verdicts above rank noise")


def test_the_study_verdicts_are_one_holm_family_per_metric():
    study = load_study(CI_STUDY)
    base = [0.80, 0.82, 0.78, 0.81]
    outcome = arm_rows({"paper": [(0.5, v) for v in base],
                        "constant": [(0.5, v + d) for v, d in zip(base, (0.05, 0.04, 0.06, 0.05))],
                        "schedule": [(0.5, v - d) for v, d in zip(base, (0.06, 0.05, 0.07, 0.06))],
                        "population": [(0.5, v + d) for v, d in zip(base, (0.01, -0.02, 0.02, 0.0))]})
    found = paired_verdicts(outcome.rows, study.comparisons(), ["val_knn_top1_k20", "test_knn_top1_k20"], 0.01)
    assert len(found) == 10
    for metric in ("val_knn_top1_k20", "test_knn_top1_k20"):
        family = [v for v in found if v.metric == metric]
        ranked = sorted(family, key=lambda v: v.p)
        assert ranked[0].p_adjusted == pytest.approx(min(1.0, 5 * ranked[0].p))  # five comparisons per metric
        verdicts = {(v.configuration, v.baseline): v.verdict for v in family}
        assert verdicts[("arm=constant", "arm=paper")] == PAYS
        assert verdicts[("arm=schedule", "arm=paper")] == HURTS
        assert verdicts[("arm=schedule", "arm=constant")] == HURTS
        assert verdicts[("arm=population", "arm=paper")] == NO_EVIDENCE
    assert all(not math.isnan(v.low) for v in found)
