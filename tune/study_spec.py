"""A schedule study, as written in ``configs/study/*.yaml``: does tuning VarCon's temperature pay, and which way?

    experiment: ../digits.yaml              # what every run of the study trains (relative to this file)
    experiment_overrides: {optim.epochs: 6, ray.num_workers: 1}
    study: {name: digits-study, seeds: 3, min_gain: 0.01, search_trials: 4, ...}      (``StudySettings``)
    constant:   {loss.tau1: {type: loguniform, ...}, loss.eps: {..., below: loss.tau1}}  # B's search space
    schedule:   {loss.schedule.kind: {type: choice, values: [cosine, periodic]}, ...}   # C's search space
    population: {loss.tau1: {...}, loss.eps: {...}}                                      # D's initial population

Four arms (``ARMS``), each a way to choose VarCon's temperature:

    paper       A: the paper's constant, loss.tau1 0.1 and loss.eps 0.02 (``PAPER``); nothing searched
    constant    B: a constant tau1, eps found by a search (tune.searcher random or optuna, FIFO)
    schedule    C: a temperature schedule (monotone or periodic) found by a search
    population  D: the schedule a PBT population discovered (its best trial's lineage), replayed from scratch

Equal budgets: B, C and D each train ``search_trials`` trials of ``optim.epochs`` epochs (FIFO stops none; D's
population is ``search_trials``), exactly ``search_trials x optim.epochs`` trial-epochs each. Every search trial
trains with the experiment's ``seed``, selects on the validation monitor and reads no test split
(``eval.final_split=val``, no final probe or few-shot episodes: ``SEARCH_EVAL``). Each arm's choice is then
retrained, identically for every arm, with ``seeds`` fresh seeds (the experiment's seed + 1 ... + seeds, one grid sweep:
replicate r of every arm trains with the same seed, hence the same initialisation and data order): only these
retrainings read the test split. Every arm is compared with each of ``baselines`` that comes before it in
``ARMS`` order, seed by seed (``tune.verdicts``).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import (
    REPO_ROOT,
    ConfigError,
    ExperimentConfig,
    build_config,
    build_dataclass,
    setting,
    to_dict,
    yaml_problem,
)
from tune.spec import POPULATION_KEYS, SweepSpec, load_experiment, split_overrides, sweep_spec, with_values

DEFAULT_STUDY = REPO_ROOT / "configs" / "study" / "digits.yaml"
ARMS = ("paper", "constant", "schedule", "population")
SEARCHED = ARMS[1:]  # the arms whose choice a search makes: each file names its space under the arm's name
PAPER = {"loss.tau1": 0.1, "loss.eps": 0.02, "loss.schedule.kind": "constant"}  # VarCon's reference setting
SEARCH_EVAL = {"eval.final_split": "val", "eval.probe": "features", "eval.linear_probe_epochs": 0,
               "eval.few_shot_episodes": 0}  # a search trial: the validation monitor selects; nothing else is read
ARM = "arm"  # the retraining grid's key: a configuration is labelled arm=<name>


@dataclass
class StudySettings:
    name: str = setting("study", "names the study's MLflow parent run and its sweeps (<name>-<arm>, <name>-retrain)")
    seeds: int = setting(3, "retrainings of each arm's choice (seeds seed+1 ... seed+seeds, paired across arms); "
                            ">= 3 for a verdict")
    min_gain: float = setting(0.0, "the least mean paired gain a 'pays' verdict needs, in the metric's units (0.01 "
                                   "= one point of top-1), declared before the study runs")
    baselines: list[str] = setting(factory=lambda: ["paper", "constant"],
                                   help="arms every later arm (in paper, constant, schedule, population order) is "
                                        "compared with")
    search_trials: int = setting(4, "trials of each search (B, C) and D's population: each searched arm trains "
                                    "search_trials x optim.epochs trial-epochs")
    searcher: str = setting("random", "random | optuna (TPE): the searcher of B and C")
    seed: int = setting(0, "the searchers' seed (B, C; D's population); the runs train with the experiment's seed")
    perturbation_interval: int = setting(2, "D: epochs between PBT's exploit/explore steps")
    quantile_fraction: float = setting(0.25, "D: bottom fraction that copies the top fraction")
    resample_probability: float = setting(0.25, "D: chance to resample instead of perturbing by 0.8/1.2")
    max_concurrent_trials: int = setting(0, "0: as many trials as the cluster holds (tune.max_concurrent_trials)")
    trial_driver_cpus: float = setting(0.0, "CPUs for each trial's Ray Train driver (tune.trial_driver_cpus)")
    gpu_seconds_per_epoch: float = setting(0.0, "one trial's GPU-seconds per training epoch, all its workers "
                                                "together (bench/gpu_throughput.py, or a run's epoch_time_s x "
                                                "ray.num_workers): the GPU-hours printed before the study starts; "
                                                "0 = unknown")
    output_dir: str = setting(".cache/sweeps", "the sweeps' folders and <output_dir>/<name>/ (the study's tables)")


@dataclass
class StudySpec:
    settings: StudySettings
    experiment: dict  # raw experiment config: base file with experiment_overrides and command-line overrides
    spaces: dict[str, dict]  # searched arm -> its raw space mapping
    source: str = ""

    @functools.cached_property
    def base(self) -> ExperimentConfig:
        return build_config(self.experiment)

    @property
    def epochs(self) -> int:
        return self.base.optim.epochs

    def search(self, arm: str) -> SweepSpec:
        """The sweep that chooses ``arm``'s temperature (B, C: FIFO searches; D: PBT)."""
        s = self.settings
        tune = {"name": f"{s.name}-{arm}", "num_samples": s.search_trials, "seed": s.seed,
                "max_concurrent_trials": s.max_concurrent_trials, "trial_driver_cpus": s.trial_driver_cpus,
                "output_dir": s.output_dir}
        if arm == "population":
            tune.update(scheduler="pbt", searcher="random", perturbation_interval=s.perturbation_interval,
                        quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
                        mutate=[key for key in self.spaces[arm] if key in POPULATION_KEYS],
                        max_concurrent_trials=0)  # PBT: the whole population is live
        else:
            tune.update(scheduler="fifo", searcher=s.searcher)
        experiment = with_values(self.experiment, SEARCH_EVAL)
        return sweep_spec(tune, experiment, self.spaces[arm], self.source)

    def retraining(self, choices: dict[str, dict]) -> SweepSpec:
        """One grid sweep over the arms' choices (``{arm: {dotted key: value}}``) x ``seeds`` fresh seeds, the test
        split read at the end of each run."""
        s = self.settings
        experiment = with_values(self.experiment, {"seed": self.base.seed + 1, "eval.final_split": "test"})
        space = {ARM: {"type": "grid", "values": [{"name": arm, **choices[arm]} for arm in ARMS]}}
        tune = {"name": f"{s.name}-retrain", "searcher": "grid", "scheduler": "fifo", "num_samples": 1,
                "seeds": s.seeds, "max_concurrent_trials": s.max_concurrent_trials,
                "trial_driver_cpus": s.trial_driver_cpus, "output_dir": s.output_dir}
        return sweep_spec(tune, experiment, space, self.source)

    def digest(self) -> str:
        """What the study is (settings, spaces, experiment): a re-run resumes only the same study."""
        text = json.dumps(resolved_study(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def comparisons(self) -> list[tuple[str, str]]:
        """``(configuration, baseline)`` labels: every arm against each baseline before it."""
        return [(label(arm), label(baseline)) for baseline in self.settings.baselines
                for arm in ARMS[ARMS.index(baseline) + 1:]]

    def trial_epochs(self) -> tuple[int, int]:
        """(search, retraining) trial-epochs: each searched arm search_trials x epochs; every arm seeds x epochs."""
        s = self.settings
        return len(SEARCHED) * s.search_trials * self.epochs, len(ARMS) * s.seeds * self.epochs

    def plan(self) -> str:
        """What the study will train and its GPU-hours, printed before anything starts."""
        s, r = self.settings, self.base.ray
        search, retrain = self.trial_epochs()
        lines = [f"study {s.name}: arms {', '.join(ARMS)}; verdicts of "
                 f"{', '.join(f'{a} vs {b}' for a, b in self.comparisons())}".replace("arm=", ""),
                 f"  searches: {len(SEARCHED)} arms x {s.search_trials} trials x {self.epochs} epochs = {search} "
                 f"trial-epochs (validation only)",
                 f"  retrainings: {len(ARMS)} arms x {s.seeds} seeds x {self.epochs} epochs = {retrain} trial-epochs "
                 f"(validation and test)",
                 f"  each trial: {r.num_workers} Ray Train worker(s) of {r.cpus_per_worker:g} CPUs"
                 + (f" and 1 GPU each ({r.num_workers} GPUs)" if r.use_gpu else ", no GPU")]
        total = search + retrain
        if not r.use_gpu:
            lines.append(f"  estimated GPU-hours: 0 (ray.use_gpu=false: {total} trial-epochs on CPUs)")
        elif s.gpu_seconds_per_epoch:
            lines.append(f"  estimated GPU-hours: {total * s.gpu_seconds_per_epoch / 3600:.1f} ({total} trial-epochs "
                         f"x {s.gpu_seconds_per_epoch:g} GPU-s per trial-epoch; training only, evaluation extra)")
        else:
            lines.append(f"  estimated GPU-hours: unknown ({total} trial-epochs): set study.gpu_seconds_per_epoch")
        return "\n".join(lines)


def label(arm: str) -> str:
    """The retraining's configuration label of ``arm`` (``tune.results.TrialRow.configuration``)."""
    return f"{ARM}={arm}"


def load_study(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read a study YAML (default: configs/study/digits.yaml), apply overrides (``study.<key>=value`` a study
    setting, any other ``key=value`` an experiment value), check every sweep it will run."""
    path = Path(path) if path else DEFAULT_STUDY
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist: pass one of configs/study/*.yaml to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"study file {path} is not valid YAML ({yaml_problem(exc)}): fix the syntax") from None
    allowed = {"experiment", "experiment_overrides", "study", *SEARCHED}
    unknown = set(raw) - allowed if isinstance(raw, dict) else set()
    if not isinstance(raw, dict) or unknown or "experiment" not in raw or \
            not all(isinstance(raw.get(arm), dict) and raw[arm] for arm in SEARCHED):
        raise ConfigError(f"study file {path} must hold experiment: FILE, the search spaces {', '.join(SEARCHED)} "
                          f"(each {{key: {{type: ...}}}}) and optionally experiment_overrides and study"
                          + (f" (unknown: {sorted(unknown)})" if unknown else ""))
    settings_raw, experiment_overrides = split_overrides(raw.get("study"), overrides, "study.")
    settings = build_dataclass(StudySettings, settings_raw, "study.")
    study = StudySpec(settings, load_experiment(path, raw, experiment_overrides), {a: raw[a] for a in SEARCHED},
                      str(path))
    _validate(study)
    return study


def _validate(study: StudySpec) -> None:
    s, base = study.settings, study.base

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(s.seeds >= 3, f"study.seeds={s.seeds}: a verdict needs at least 3 seeds (pairs)")
    need(s.min_gain >= 0, f"study.min_gain={s.min_gain} must be >= 0")
    need(s.search_trials >= 2, f"study.search_trials={s.search_trials} must be >= 2 (PBT needs a population)")
    need(s.searcher in ("random", "optuna"), f"study.searcher={s.searcher!r} must be random or optuna")
    need(s.gpu_seconds_per_epoch >= 0, f"study.gpu_seconds_per_epoch={s.gpu_seconds_per_epoch} must be >= 0")
    need(bool(s.baselines) and all(b in ARMS[:-1] for b in s.baselines) and len(set(s.baselines)) == len(s.baselines),
         f"study.baselines={s.baselines} must name arms (once each) among {', '.join(ARMS[:-1])}: an arm is compared "
         f"with the baselines before it in {', '.join(ARMS)} order")
    need(base.loss.name == "varcon", f"loss.name={base.loss.name}: a study tunes VarCon's temperature (varcon)")
    need(base.data.val_fraction > 0, "a study selects on the validation split, and data.val_fraction=0 leaves none: "
                                     "set data.val_fraction (e.g. 0.1) in experiment_overrides")
    need(base.eval.initial_fraction == 1, f"eval.initial_fraction={base.eval.initial_fraction}: a study compares each "
                                          f"arm with its randomly initialised encoder on the whole validation split: "
                                          f"set eval.initial_fraction=1")
    need(base.eval.test_every_epochs == 0, f"eval.test_every_epochs={base.eval.test_every_epochs}: search trials read "
                                           f"no test split: set eval.test_every_epochs=0")
    need(base.loss.schedule.kind == "constant", f"loss.schedule.kind={base.loss.schedule.kind}: the arms choose the "
                                                f"schedule; keep the experiment's constant")
    spaces = study.spaces
    for arm in ("constant", "schedule"):
        other = [k for k in spaces[arm] if k not in POPULATION_KEYS and not k.startswith("loss.schedule.")]
        need(not other, f"the {arm} arm's space holds {', '.join(other)}: a study compares ways of choosing the "
                        f"temperature, so its spaces hold loss.tau1, loss.eps and loss.schedule.* only (set other "
                        f"values for every arm in experiment_overrides)")
    need(not any(k.startswith("loss.schedule") for k in spaces["constant"]),
         "the constant arm's space holds loss.schedule keys: move them to the schedule arm")
    need(any(k.startswith("loss.schedule") for k in spaces["schedule"]),
         "the schedule arm's space holds no loss.schedule key (e.g. loss.schedule.kind: {type: choice, values: "
         "[cosine, periodic]})")
    need(all(k in POPULATION_KEYS for k in spaces["population"]),
         f"the population arm's space may hold only {', '.join(POPULATION_KEYS)} (PBT changes them during training)")
    for arm in SEARCHED:
        try:
            study.search(arm)
        except ConfigError as exc:
            raise ConfigError(f"{arm} arm: {exc}") from None
    try:
        study.retraining({arm: PAPER for arm in ARMS})
    except ConfigError as exc:
        raise ConfigError(f"retraining: {exc}") from None


def resolved_study(study: StudySpec) -> dict:
    """The study as ``varcon config`` prints it."""
    return {"study": vars(study.settings), **study.spaces, "experiment": to_dict(study.base)}
