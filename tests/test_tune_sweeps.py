"""Tiny sweeps on the digits, checked in the MLflow store.

Each sweep is ``varcon tune`` in its own process with the local Ray instance it starts itself, as on a laptop: a
sweep shares no Ray state with earlier tests (the session's cluster has seen workers and servers killed by the
fault tests), and a sweep that hangs fails its own test at the timeout without taking the next ones with it.
Each trial is 1 worker x 1 CPU; epochs are few and evaluation is cut short.
"""
import csv
import json
import statistics
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from services import patience
from varcon_process import succeeded, varcon

from pipeline import checkpoint, engine
from pipeline.config import REPO_ROOT, load_config
from pipeline.data import prepare_dataset
from pipeline.data.manifest import sha256_of
from pipeline.names import EXPLOITS_TAG
from pipeline.train_job import checkpoints_in
from tune import space
from tune.spec import load_sweep

SHORT_EVAL = ["eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]
def store(home):
    return MlflowClient(f"sqlite:///{home / '.cache' / 'mlflow' / 'mlflow.db'}")


def sweep_runs(client, name):
    experiment = client.get_experiment_by_name("varcon")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`varcon.sweep` = '{name}' and "
                                                               f"tags.`varcon.kind` = 'sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def write_asha_sweep(tmp_path):
    """Trials differ in the learning rate only and run one at a time, in the seeded order of the searcher (two
    1e-5 trials, then two lr-20 trials). ASHA's only rung is epoch 2: the first trial sets it. lr 1e-5 barely
    moves the weights (its monitor still moves with BatchNorm's running statistics: 132, 126, 128 of the 140
    validation images at epochs 0-2), while lr 20 without warm-up wrecks the encoder: the third trial scores 101
    at the rung, 27 images below the cutoff, so it is stopped whatever float rounding does. (lr 0.5, used
    before, recovers by epoch 2 to 127 of 140: one image below the cutoff, and a flip of one neighbour let it
    through.)"""
    path = tmp_path / "asha.yaml"
    path.write_text(f"""experiment: {REPO_ROOT / 'configs' / 'digits.yaml'}
experiment_overrides: {{optim.epochs: 3, optim.warmup_epochs: 0, ray.num_workers: 1, ray.checkpoint_upload: async}}
tune: {{name: t-asha, searcher: random, scheduler: asha, num_samples: 4, grace_period: 2, reduction_factor: 2,
        seed: {ASHA_SEED}, registered_model_name: t-asha-best, max_concurrent_trials: 1}}
space:
  optim.lr: {{type: choice, values: [20.0, 1.0e-5]}}
  loss.tau1: {{type: loguniform, low: 0.08, high: 0.12}}
  loss.eps: {{type: uniform, low: 0.0, high: 0.02, below: loss.tau1}}
""")
    return path


ASHA_SEED = 5


REUSE_CHECK = """
import hashlib, json, sys
from pipeline.config import load_config
from pipeline.data import PreparedDataset, ffcv_loader
from pipeline.data.loaders import eval_loaders, train_loader
from pipeline.data.prepare import dataset_splits

config = load_config(None, ["ray.num_workers=1"])
files = PreparedDataset.from_dict(json.loads(sys.argv[1]))
split = dataset_splits(config.data, files)


def digest():  # every batch of a trial's four loaders
    found = hashlib.sha256()
    for loader in [train_loader(config, files, 64, False, split), *eval_loaders(
            config, files, 256, False, {"bank": split.bank, "val": split.val, "test": None}).values()]:
        for batch in loader:
            for tensor in batch:
                found.update(tensor.contiguous().numpy().tobytes())
    return found.hexdigest()


digests = {"plain": digest()} if sys.argv[3] == "plain first" else {}
ffcv_loader.reuse_compiled_code(sys.argv[2])
digests["reused"] = digest()
print(json.dumps({**digests, "shared": len(ffcv_loader._compiled)}))
"""


def test_trial_workers_reuse_compiled_loader_code_without_changing_a_batch(digits_files, tmp_path):
    """What a trial's Ray Train worker turns on (``pipeline.data.ffcv_loader.reuse_compiled_code``): the four
    loaders give the same batches as with FFCV's own compiles, the bank, validation and test loaders share their
    compiled decoder, and the next process loads numba's cache from the folder."""
    import subprocess
    import sys

    def run(order: str, **env) -> tuple[dict, str]:
        done = subprocess.run([sys.executable, "-c", REUSE_CHECK, json.dumps(digits_files.as_dict()),
                               str(tmp_path / "numba"), order], capture_output=True, text=True,
                              timeout=patience(300),
                              cwd=REPO_ROOT, env={**__import__("os").environ, **env})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout

    first, _ = run("plain first")
    assert first["reused"] == first["plain"]
    assert first["shared"] == 2  # the two-view decoder, and one centre-crop decoder for bank, validation, test
    again, printed = run("reused only", NUMBA_DEBUG_CACHE="1")
    assert again["reused"] == first["plain"]
    from pipeline.data.ffcv_loader import _cpu_kind
    assert f"[cache] data loaded from '{tmp_path / 'numba' / _cpu_kind()}/" in printed  # a folder per CPU kind


def test_seeded_random_search_orders_the_asha_trials(tmp_path):
    """The order the ASHA test relies on, drawn from the same sampler and space."""
    spec = load_sweep(write_asha_sweep(tmp_path))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=ASHA_SEED))
    lrs = []
    for _ in range(4):
        trial = study.ask()
        space.OptunaDefineByRun(spec)(trial)
        lrs.append(trial.params["optim.lr"])
        study.tell(trial, 0.0)
    assert lrs == [1e-5, 1e-5, 20.0, 20.0]


def trained_epochs(home, run):
    """The epochs a trial's checkpoints cover (its last checkpoint's epoch)."""
    kept = checkpoints_in(home / ".cache" / "ray_results" / run.data.tags["varcon.run_key"])
    return kept[-1].record.epoch if kept else 0


@pytest.mark.cluster
def test_asha_sweep_stops_trials_survives_a_diverging_one_and_writes_a_trainable_best_config(
        varcon_home, tmp_path, inject_faults):
    """The second trial (lr 1e-5) gets a NaN into its weights after epoch 1: it ends at epoch 2 with the reason,
    is not retried, its epoch-1 checkpoint stays, and the other trials go on. The third (lr 20) is stopped at the
    rung while its epoch-3 checkpoint is being uploaded (checkpoints upload asynchronously, as in the CIFAR
    sweep): its record ends at the rung, and the stored but never registered epoch-3 folder is removed. What the
    product promises for every trial, whatever the timing of a scheduler's stop: every epoch its checkpoints
    cover is logged exactly once, and its MLflow status says why it ended."""
    signals = tmp_path / "signals"
    signals.mkdir()
    inject_faults(runs={2: {"nan_after_epoch": 1},
                        3: {"upload_in_flight_at_stop": {"epoch": 3, "signals": str(signals)}}})
    printed = succeeded(varcon("tune", "--config", str(write_asha_sweep(tmp_path)), *SHORT_EVAL))
    client = store(varcon_home)
    parent, children = sweep_runs(client, "t-asha")
    assert parent.info.status == "FINISHED"
    trial_ids = [run.data.tags["varcon.trial_id"] for run in children]
    assert len(children) == 4 and len(set(trial_ids)) == 4  # one child run per trial
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(1, trained_epochs(varcon_home, run) + 1)), run.data.tags["varcon.trial_id"]

    (diverged,) = [run for run in children if run.info.status == "FAILED"]
    assert float(diverged.data.params["optim.lr"]) == 1e-5
    assert "training loss became nan at epoch 2" in diverged.data.tags["varcon.error"]
    assert [m.step for m in client.get_metric_history(diverged.info.run_id, "train_loss")] == [1]  # no retry
    (line,) = [line for line in printed.splitlines() if line.startswith(diverged.data.tags["varcon.trial_id"])]
    assert "error: diverged: training loss became nan at epoch 2" in line
    assert "1 of 4 trials ended with an error" in printed
    (kept,) = checkpoints_in(varcon_home / ".cache" / "ray_results" / diverged.data.tags["varcon.run_key"])
    state = checkpoint.load(kept.folder.path)  # the last good one, not overwritten
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())

    stopped = [run for run in children if run.data.tags.get("varcon.early_stopped") == "true"]
    assert stopped and all(run.info.status == "KILLED" and "varcon.error" not in run.data.tags for run in stopped)
    # the third trial's epoch-3 upload was stored, and in flight at the stop
    (held,) = [run for run in children if run.data.tags["varcon.run_key"] == (signals / "held").read_text()]
    assert held in stopped and trained_epochs(varcon_home, held) == 2
    assert [m.step for m in client.get_metric_history(held.info.run_id, "train_loss")] == [1, 2]
    run_folder = varcon_home / ".cache" / "ray_results" / held.data.tags["varcon.run_key"]
    kept = checkpoints_in(run_folder)
    assert sorted(p.name for p in run_folder.glob("checkpoint_*") if p.is_dir()) == sorted(c.folder.name for c in kept)
    assert all(float(run.data.params["optim.lr"]) == 20.0 for run in stopped)
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert finished and len(finished) + len(stopped) == 3
    assert all(trained_epochs(varcon_home, run) == 3 and "varcon.model_uri" in run.data.tags for run in finished)
    assert client.get_metric_history(parent.info.run_id, "trials_error")[-1].value == 1
    best_run_id = parent.data.tags["varcon.best_run_id"]
    assert best_run_id in {run.info.run_id for run in finished}
    (version,) = client.search_model_versions("name='t-asha-best'")
    assert version.run_id == best_run_id
    for trial_id in trial_ids:
        assert trial_id in printed  # the table of trials

    best_config = varcon_home / ".cache" / "sweeps" / "t-asha" / "best_config.yaml"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best_config.yaml", "trials.csv", "analysis"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")} == {
        f"analysis/{name}" for name in ("importance.txt", "importance.csv", "parallel_coordinates.png",
                                        "best_schedules.png")}
    assert "hyperparameter importance for the monitor (monitor_top1 at epoch 2 (ASHA's first rung)" in printed
    config = load_config(best_config, ["optim.epochs=1", "ray.num_workers=1", "eval.every_epochs=5",
                                       "eval.linear_probe_epochs=0", "eval.few_shot_episodes=0"])
    best = client.get_run(best_run_id)
    assert config.optim.lr == float(best.data.params["optim.lr"])
    assert config.loss.tau1 == pytest.approx(float(best.data.params["loss.tau1"]))
    files = prepare_dataset(config.data, varcon_home / ".cache" / "data", log=lambda *_: None)
    reports = []
    engine.fit(config, files, torch.device("cpu"), lambda epoch, metrics, _: reports.append(epoch))
    assert reports == [0, 1]


def test_the_sweep_driver_ends_a_trial_the_scheduler_stopped_as_killed(varcon_home, tmp_path):
    """Only the sweep's summary sets a trial's final status: a trial Tune stopped early ends KILLED with
    varcon.early_stopped, even if an earlier attempt of it had failed (its error tag is removed)."""
    from types import SimpleNamespace

    from pipeline.tracking import create_run, resolve_tracking_uri
    from tune.sweep import summarise

    spec = load_sweep(write_asha_sweep(tmp_path)).with_absolute_paths()
    uri = resolve_tracking_uri()
    parent = create_run(uri, "varcon", "sweep:t-asha", "t-asha", {})
    trial = create_run(uri, "varcon", "t-asha-abc", "t-asha-abc", {}, {"varcon.trial_id": "abc"},
                       parent_run_id=parent.run_id)
    trial.set_tags({"varcon.error": "ActorDiedError: an earlier attempt's controller died"})
    stopped = SimpleNamespace(metrics={"trial_id": "abc", "epoch": 2, "monitor_top1": 0.5}, path="x", error=None,
                              config={"optim.lr": 0.5, "loss.tau1": 0.1, "loss.eps": 0.01}, checkpoint=None,
                              best_checkpoints=[])
    outcome = summarise(spec, [stopped], parent, {}, log=lambda *_: None)
    assert [str(row.status) for row in outcome.rows] == ["early-stopped"] and outcome.best is None
    run = MlflowClient(uri).get_run(trial.run_id)
    assert run.info.status == "KILLED" and run.data.tags["varcon.early_stopped"] == "true"
    assert "varcon.error" not in run.data.tags


@pytest.mark.cluster
def test_pbt_trials_are_two_node_ray_train_runs_and_an_exploit_starts_from_the_donor_checkpoint(varcon_home,
                                                                                               ray_session):
    """PBT's trials are Ray Train runs of 2 workers on the session's two nodes (STRICT_SPREAD: one per node), as
    FIFO/ASHA trials are. Every trial pauses at epoch 2; the bottom half restarts as a new Ray Train run from the top
    half's Train checkpoint, named by its Tune checkpoint: the state it loaded is that checkpoint's, byte for byte."""
    overrides = ["--config", "configs/tune/digits_pbt.yaml", "tune.name=t-pbt", "tune.num_samples=2",
                 "tune.quantile_fraction=0.5", "tune.perturbation_interval=2", "optim.epochs=3",
                 "optim.warmup_epochs=0", "ray.num_workers=2", "ray.placement_strategy=STRICT_SPREAD", *SHORT_EVAL]
    succeeded(varcon("tune", *overrides, env={"RAY_ADDRESS": ray_session.address}))  # joins the 2-node cluster
    client = store(varcon_home)
    parent, children = sweep_runs(client, "t-pbt")
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}
    by_id = {run.info.run_id: run for run in children}
    exploited = [run for run in children if EXPLOITS_TAG in run.data.tags]
    assert len(exploited) == 1  # of two, the bottom half copies the top half once, after epoch 2
    (link,) = json.loads(exploited[0].data.tags[EXPLOITS_TAG])
    assert link["epoch"] == 2 and link["donor_run_id"] in by_id and link["donor_run_id"] != exploited[0].info.run_id
    donor_key = by_id[link["donor_run_id"]].data.tags["varcon.run_key"]
    donor_checkpoint = Path(link["donor_checkpoint"])
    # the donor's own Train checkpoint of epoch 2, in one of its segments (a Ray Train run per start of the trial)
    assert donor_checkpoint.parent.name.startswith(f"{donor_key}-")
    assert checkpoint.load_record(donor_checkpoint).epoch == 2
    assert checkpoint.load_record(donor_checkpoint).run_id == link["donor_run_id"]
    assert sha256_of(donor_checkpoint / checkpoint.STATE_FILE) == link["donor_state_sha256"]
    results = varcon_home / ".cache" / "ray_results"
    for run in children:  # each trial restarted after the pause as a new segment, from which it trained epoch 3
        key = run.data.tags["varcon.run_key"]
        (final,) = [c for c in results.glob(f"{key}-*/checkpoint_*")
                    if c.is_dir() and checkpoint.load_record(c).epoch == 3]
        assert final.parent.name != donor_checkpoint.parent.name and final.parent.name.startswith(f"{key}-")
        # every epoch once, across the pause and the exploit (the receiver's epochs 1-2 are its own, before it)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(exploited[0].info.run_id, "plots")}
    assert {"plots/discovered_schedule.png", "plots/temperature_schedule.png"} <= artifacts

    best_config = load_config(varcon_home / ".cache" / "sweeps" / "t-pbt" / "best_config.yaml")
    schedule = best_config.loss.schedule
    assert schedule.kind == "piecewise" and schedule.epochs[0] == 1
    assert all(0 <= eps < tau1 for tau1, eps in zip(schedule.tau1_values, schedule.eps_values))
    assert best_config.ray.num_workers == 2


@pytest.mark.cluster
def test_an_interrupted_sweep_resumes_without_repeating_a_trial(varcon_home, tmp_path):
    args = ["tune", "tune.name=t-resume", "tune.searcher=random", "tune.num_samples=2", "tune.scheduler=fifo",
            "optim.epochs=1", "optim.warmup_epochs=0", *SHORT_EVAL]
    faults = tmp_path / "exit-after-one-trial.json"
    faults.write_text(json.dumps({"exit_sweep_after_trials": 1}))
    killed = varcon(*args, env={"VARCON_FAULTS_FILE": str(faults)})
    assert killed.returncode == 3, killed.stderr[-2000:]  # the driver died after the first trial completed
    client = store(varcon_home)
    _, before = sweep_runs(client, "t-resume")
    # a trial that trained every epoch before the driver died (the other was running or finishing); its run is
    # still open: only the sweep's summary sets a trial's final status
    done_before = [run for run in before if trained_epochs(varcon_home, run) == 1]
    assert done_before and all(run.info.status == "RUNNING" for run in before)
    folders = {run.info.run_id: varcon_home / ".cache" / "ray_results" / run.data.tags["varcon.run_key"]
               for run in done_before}
    checkpoints = {run_id: sorted(p.name for p in folder.glob("checkpoint_*")) for run_id, folder in folders.items()}

    succeeded(varcon(*args))  # a new driver, on a new Ray instance, resumes the sweep from its storage
    parent, children = sweep_runs(client, "t-resume")
    trial_ids = [run.data.tags["varcon.trial_id"] for run in children]
    assert len(children) == 2 and len(set(trial_ids)) == 2 and parent.info.status == "FINISHED"
    assert {run.info.status for run in children} == {"FINISHED"}
    assert {run.info.run_id for run in done_before} <= {run.info.run_id for run in children}  # same MLflow runs
    for run_id, folder in folders.items():  # a finished trial was not trained again: no new checkpoint
        assert sorted(p.name for p in folder.glob("checkpoint_*")) == checkpoints[run_id] and checkpoints[run_id]
    for run in children:  # one value per epoch, none twice
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]


@pytest.mark.cluster
def test_the_ci_study_runs_every_arm_and_only_its_retrainings_read_the_test_split(varcon_home, ray_session):
    """configs/study/digits_ci.yaml: three 2-trial searches (FIFO, FIFO, PBT) of 2 epochs each and the four arms'
    choices retrained with seeds 1-3, nested in one study run. Searches read no test split and train equal
    trial-epochs; PBT's exploit after epoch 1 leaves every epoch once in MLflow (none at the last epoch, which
    would hand the receiver the donor's run); the discovered schedule replays; the verdicts and the gains over
    random initialisation logged to the study run are the retrained runs' own figures, paired by seed.

    The study joins the session's cluster: a Ray instance of its own beside it would be a second one on this
    machine, where Ray Train's placement-group cleaner (its state-API query) cannot tell which is its own, and a
    paused PBT trial's worker group would keep its CPU (seen here: the restarted trials waited for it forever)."""
    printed = succeeded(varcon("study", "--config", str(REPO_ROOT / "configs" / "study" / "digits_ci.yaml"),
                               *SHORT_EVAL, env={"RAY_ADDRESS": ray_session.address}))
    assert printed.index("estimated GPU-hours: 0") < printed.index("starting study digits-study-ci")
    client = store(varcon_home)
    experiment = client.get_experiment_by_name("varcon").experiment_id
    (study,) = client.search_runs([experiment], "tags.`varcon.kind` = 'study'")
    assert study.info.status == "FINISHED"
    nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study.info.run_id}'")
    arms = ("constant", "schedule", "population")
    assert sorted(run.data.tags["varcon.sweep"] for run in nested) == sorted(
        [f"digits-study-ci-{arm}" for arm in arms] + ["digits-study-ci-retrain"])
    for arm in arms:
        _, trials = sweep_runs(client, f"digits-study-ci-{arm}")
        assert len(trials) == 2 and {run.info.status for run in trials} == {"FINISHED"}
        for run in trials:
            assert not [key for key in run.data.metrics if key.startswith("test_")], run.data.metrics
            assert run.data.params["seed"] == "0" and run.data.params["eval.final_split"] == "val"
            for key in ("train_loss", "train_grad_norm"):  # every epoch once: 2 trials x 2 epochs per arm
                assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], (arm, key)
    _, population = sweep_runs(client, "digits-study-ci-population")
    (exploited,) = [run for run in population if EXPLOITS_TAG in run.data.tags]
    assert [link["epoch"] for link in json.loads(exploited.data.tags[EXPLOITS_TAG])] == [1]

    retrain, retrained = sweep_runs(client, "digits-study-ci-retrain")
    assert {run.info.status for run in retrained} == {"FINISHED"}
    assert all("test_knn_top1_k20" in run.data.metrics for run in retrained)
    by_id = {run.info.run_id: run for run in retrained}
    with open(client.download_artifacts(retrain.info.run_id, "trials.csv", str(varcon_home))) as handle:
        runs = {}  # arm -> seed -> its retrained MLflow run
        for row in csv.DictReader(handle):
            run = by_id[row["mlflow_run_id"]]
            runs.setdefault(row["arm"], {})[int(run.data.params["seed"])] = run
    assert {arm: sorted(seeds) for arm, seeds in runs.items()} == {
        arm: [1, 2, 3] for arm in ("paper", "constant", "schedule", "population")}  # fresh seeds, paired
    assert {r.data.params["loss.schedule.kind"] for r in runs["population"].values()} == {"piecewise"}
    assert {r.data.params["loss.tau1"] for r in runs["paper"].values()} == {"0.1"}
    with open(client.download_artifacts(retrain.info.run_id, "comparison.csv", str(varcon_home))) as handle:
        compared = {row["configuration"]: row for row in csv.DictReader(handle)}  # mean +- sd over the seeds
    for arm, seeds in runs.items():
        values = [run.data.metrics["test_knn_top1_k20"] for run in seeds.values()]
        assert float(compared[f"arm={arm}"]["test_knn_top1_k20_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(compared[f"arm={arm}"]["test_knn_top1_k20_sd"]) == pytest.approx(statistics.stdev(values))
    with open(client.download_artifacts(study.info.run_id, "verdicts.csv", str(varcon_home))) as handle:
        verdicts = {(row["configuration"], row["baseline"], row["metric"]): row for row in csv.DictReader(handle)}
    assert {(c, b) for c, b, _ in verdicts} == {("arm=constant", "arm=paper"), ("arm=schedule", "arm=paper"),
                                                ("arm=population", "arm=paper"), ("arm=schedule", "arm=constant"),
                                                ("arm=population", "arm=constant")}
    assert {m for *_, m in verdicts} >= {"val_knn_top1_k20", "test_knn_top1_k20", "test_probe_top1"}
    for (configuration, baseline, metric), row in verdicts.items():
        mine, base = runs[configuration.removeprefix("arm=")], runs[baseline.removeprefix("arm=")]
        differences = [mine[seed].data.metrics[metric] - base[seed].data.metrics[metric] for seed in (1, 2, 3)]
        assert float(row["mean_difference"]) == pytest.approx(statistics.fmean(differences))
    with open(client.download_artifacts(study.info.run_id, "initial_gain.csv", str(varcon_home))) as handle:
        gains = {row["configuration"]: row for row in csv.DictReader(handle)}

    def monitor(run, step):
        return [m.value for m in client.get_metric_history(run.info.run_id, "val_knn_top1_k20") if m.step == step]

    for arm, seeds in runs.items():  # each run's final monitor minus its own epoch-0 monitor
        differences = [monitor(run, 2)[0] - monitor(run, 0)[0] for run in seeds.values()]
        assert float(gains[f"arm={arm}"]["mean_difference"]) == pytest.approx(statistics.fmean(differences))
    assert "verdicts.png" in {a.path for a in client.list_artifacts(study.info.run_id)}
    assert "study digits-study-ci: paired over 3 seeds" in printed


