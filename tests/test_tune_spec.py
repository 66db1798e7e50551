"""Sweep files, search spaces and discovered schedules, without running Ray Tune."""

import optuna
import pytest
import yaml

from pipeline import identity
from pipeline.config import REPO_ROOT, ConfigError, build_config, flatten, load_config
from pipeline.record import RunRecord
from tune import space
from tune.discovered import as_piecewise, lineage_schedule
from tune.spec import REPLICATE, load_sweep
from tune.sweep import TrialNames, concurrency, parameter_columns

SWEEPS = sorted((REPO_ROOT / "configs" / "tune").glob("*.yaml"))


def test_the_bundled_sweeps_are_found():
    # found from the repository, wherever pytest runs
    assert {"digits_asha.yaml", "digits_pbt.yaml", "digits_pb2.yaml"} <= {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_bundled_sweeps_load(path):
    spec = load_sweep(path)
    assert spec.space and spec.base.name


def test_overrides_reach_the_sweep_and_the_experiment():
    spec = load_sweep(None, ["tune.num_samples=3", "optim.epochs=2", "tune.grace_period=1"])
    assert spec.settings.num_samples == 3 and spec.base.optim.epochs == 2
    trial = spec.trial_config({"loss.tau1": 0.2, "optim.weight_decay": 1e-5}, "abc12")
    assert (trial.name, trial.ray.run_name, trial.loss.tau1, trial.optim.weight_decay) == \
        ("digits-asha-abc12", "digits-asha-abc12", 0.2, 1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["tune.searcher=bayes"], "tune.searcher='bayes' is unknown"),
    (["tune.searcher=grid"], "tune.searcher=grid needs a key of type grid"),
    (["data.val_fraction=0"], "a sweep selects trials on the validation split"),
    (["tune.seeds=0"], "tune.seeds=0 must be >= 1"),
    (["tune.metric=test_knn_top1_k20"], "is measured on the test split, which never selects"),
    (["tune.scheduler=pbt", "tune.searcher=random", "tune.seeds=2", "tune.mutate=[loss.tau1]"],
     "its replicates are not independent"),
    (["tune.schedular=asha"], "did you mean tune.scheduler"),
    (["tune.num_samples=0"], "tune.num_samples=0 must be >= 1"),
    (["tune.grace_period=6"], "must be smaller than optim.epochs"),
    (["tune.scheduler=pbt"], "use tune.searcher=random"),
])
def test_bad_sweep_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(None, overrides)


def test_a_population_capped_below_its_size_is_refused():
    """A paused PBT trial stays live in Tune: a cap below the population would shrink the population to it."""
    pbt = REPO_ROOT / "configs" / "tune" / "digits_pbt.yaml"
    with pytest.raises(ConfigError, match=r"tune.max_concurrent_trials=2 is below the population \(tune.num_samples=4"):
        load_sweep(pbt, ["tune.max_concurrent_trials=2"])
    assert load_sweep(pbt, ["tune.max_concurrent_trials=4"]).settings.max_concurrent_trials == 4


def write_sweep(tmp_path, space_yaml: str, tune_yaml: str = "") -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"experiment: {load_config.__globals__['DEFAULT_CONFIG']}\n"
                    f"tune:\n  name: t\n{tune_yaml}space:\n{space_yaml}")
    return str(path)


@pytest.mark.parametrize("space_yaml, tune_yaml, message", [
    ("  loss.tua1: {type: uniform, low: 0.1, high: 0.2}\n", "", "did you mean loss.tau1"),
    ("  loss.tau1: {type: gaussian, low: 0.1, high: 0.2}\n", "", "type='gaussian' is unknown"),
    ("  loss.tau1: {type: loguniform, low: 0.0, high: 0.2}\n", "", "needs low > 0"),
    ("  loss.tau1: {type: uniform, low: 0.3, high: 0.2}\n", "", "needs low < high"),
    ("  loss.tau1: {type: uniform, low: 0.1, high: 0.2}\n  loss.eps: {type: uniform, low: 0.1, high: 0.2, "
     "below: loss.tau1}\n", "", "so that every sample can satisfy loss.eps < loss.tau1"),
    ("  optim.lr: {type: uniform, low: -1.0, high: 0.2}\n", "", "optim.lr=-1.0 must be > 0"),
    ("  loss.name: {type: choice, values: [varcon, supcon]}\n  loss.schedule.kind: {type: choice, values: "
     "[constant, linear]}\n", "", "split it into two sweeps"),
    ("  optim.lr: {type: uniform, low: 0.1, high: 0.2}\n", "  scheduler: pbt\n  mutate: [optim.lr]\n",
     "live in the optimiser state"),
    ("  recipe: {type: grid, values: [{name: a, optim.lr: 0.1}]}\n", "", "use tune.searcher=grid"),
    ("  recipe: {type: grid, values: [0.1, 0.2]}\n", "  searcher: grid\n", "a grid over it lists recipes"),
    ("  recipe: {type: grid, values: [{name: a, optim.lr: -1}]}\n", "  searcher: grid\n",
     "optim.lr=-1.0 must be > 0"),
])
def test_bad_spaces_are_rejected(tmp_path, space_yaml, tune_yaml, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, space_yaml, tune_yaml))


def test_every_sample_keeps_eps_below_tau1():
    spec = load_sweep(None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = space.OptunaDefineByRun(spec)
    for _ in range(300):
        trial = study.ask()
        define(trial)
        sampled = trial.params
        assert 0.0 <= sampled["loss.eps"] < sampled["loss.tau1"] <= 0.5
        spec.trial_config(sampled, "x")  # every sample is a valid experiment
        study.tell(trial, 0.0)


def test_population_explore_stays_inside_the_space():
    spec = load_sweep("configs/tune/digits_pbt.yaml")
    explore = space.ExploreWithinSpace(spec)
    assert explore({"loss.tau1": 0.9, "loss.eps": 0.03}) == {"loss.tau1": 0.5, "loss.eps": 0.03}
    assert explore({"loss.tau1": 0.01, "loss.eps": 0.03}) == {"loss.tau1": 0.05, "loss.eps": 0.03}
    clipped = explore({"loss.tau1": 0.05, "loss.eps": 0.2})
    assert clipped["loss.eps"] == pytest.approx(0.04)
    assert set(space.pb2_bounds(spec)) == {"loss.tau1", "loss.eps"}


def test_a_trial_larger_than_the_cluster_is_refused():
    spec = load_sweep(None, ["ray.num_workers=4"])
    with pytest.raises(ConfigError, match="one trial needs 4 CPUs .* the Ray cluster has 2 CPUs"):
        concurrency(spec, {"CPU": 2.0})
    assert concurrency(load_sweep(None), {"CPU": 2.0}) == 2  # 1 worker x 1 CPU, drivers take none
    assert concurrency(load_sweep(None, ["tune.max_concurrent_trials=1"]), {"CPU": 8.0}) == 1


def test_lineage_follows_exploits_into_a_replayable_schedule():
    """Records continued across exploits carry the schedule of the weights' whole lineage."""
    def trained(record, tau1_by_epoch):
        for epoch, tau1 in tau1_by_epoch.items():
            record.add(epoch, {"tau1": tau1, "eps": tau1 / 10, "train_loss": 1.0})
            record.epoch = epoch
        return record

    donor = trained(RunRecord("donor", "donor", "x"), {1: 0.2, 2: 0.2})
    # b's own epochs 1-2 (tau1 0.3) were replaced by the donor's at epoch 2, then it trained on at 0.15
    b = trained(donor.continued_by("b", "b", "x"), {3: 0.15})
    # c took b's checkpoint after epoch 3, then trained epoch 4 at 0.08
    c = trained(b.continued_by("c", "c", "x"), {4: 0.08})
    lineage = lineage_schedule(c)
    assert [(e, t) for e, t, _ in lineage] == [(1, 0.2), (2, 0.2), (3, 0.15), (4, 0.08)]
    assert c.exploits == [{"epoch": 2, "donor_run_id": "donor"}, {"epoch": 3, "donor_run_id": "b"}]
    assert [entry[0] for entry in c.own_entries()] == [4, 4, 4]  # only epoch 4 is c's own to send
    schedule = as_piecewise(lineage)
    assert schedule["epochs"] == [1, 3, 4] and schedule["tau1_values"] == pytest.approx([0.2, 0.15, 0.08])
    config = build_config({"optim": {"epochs": 4}, "loss": {"schedule": schedule}})
    from pipeline.schedules import temperatures_at
    assert [temperatures_at(config.loss, e, 4).tau1 for e in range(1, 5)] == pytest.approx([0.2, 0.2, 0.15, 0.08])


def test_trials_evaluate_at_their_schedulers_rungs_and_replicates_change_only_the_seed():
    asha = load_sweep(None, ["optim.epochs=9", "tune.grace_period=2", "tune.reduction_factor=2"])
    assert asha.evaluation_epochs() == [2, 4, 8, 9]  # ASHA's rungs, then the last epoch
    first = asha.trial_config({"loss.tau1": 0.1, REPLICATE: 0}, "a")
    second = asha.trial_config({"loss.tau1": 0.1, REPLICATE: 2}, "b")
    assert first.eval.at_epochs == [2, 4, 8, 9] and (first.seed, second.seed) == (0, 2)
    assert identity.changed_keys(flatten(first), second).keys() == {"seed", "name", "ray.run_name"}
    pbt = load_sweep(REPO_ROOT / "configs" / "tune" / "digits_pbt.yaml",
                     ["optim.epochs=7", "tune.perturbation_interval=3"])
    assert pbt.evaluation_epochs() == [3, 6, 7]
    fifo = load_sweep(None, ["tune.scheduler=fifo", "optim.epochs=4"])
    assert fifo.evaluation_epochs() == [4]
    chosen = load_sweep(None, ["eval.at_epochs=[1, 3]", "optim.epochs=4"])  # the experiment's own choice stays
    assert chosen.trial_config({"loss.tau1": 0.1}, "c").eval.at_epochs == [1, 3]


def test_the_loss_comparison_runs_every_recipe_with_every_seed():
    from ray.tune.search.variant_generator import generate_variants

    spec = load_sweep(REPO_ROOT / "configs" / "tune" / "digits_loss_comparison.yaml")
    assert space.searcher(spec) is None and space.trial_count(spec) == 1
    variants = [resolved for _, resolved in generate_variants(space.param_space(spec))]
    trials = [spec.trial_config(v, f"t{i}") for i, v in enumerate(variants)]
    assert sorted((t.loss.name, t.seed) for t in trials) == sorted(
        (loss, seed) for loss in ("varcon", "supcon", "cross_entropy") for seed in (0, 1, 2))


def test_the_live_table_names_each_recipe_and_replicate_readably():
    """Tune's own trial and table code, given the sweep's name creator and columns: a recipe shows as its name,
    not as a cut-off mapping, and the replicate has its column."""
    from ray.tune.experiment import Trial
    from ray.tune.progress_reporter import _get_trial_info
    from ray.tune.search.variant_generator import generate_variants

    spec = load_sweep(REPO_ROOT / "configs" / "tune" / "digits_loss_comparison.yaml")
    columns = parameter_columns(spec)
    assert columns == {"recipe/name": "recipe", REPLICATE: "replicate"}
    rows = []
    for i, (_, config) in enumerate(generate_variants(space.param_space(spec))):
        trial = Trial("train_trial", config=config, trial_id=f"4b40a_{i:05d}", stub=True,
                      trial_name_creator=TrialNames(spec))
        rows.append(_get_trial_info(trial, list(columns), []))
    recipes = [name for name in ("varcon", "supcon", "cross_entropy") for _ in range(3)]
    assert [row[3:] for row in rows] == [[name, i % 3] for i, name in enumerate(recipes)]
    assert [row[0] for row in rows] == [f"{name}_r{i % 3}_4b40a_{i:05d}" for i, name in enumerate(recipes)]


def test_a_searched_sweep_names_trials_by_their_choices_only():
    spec = load_sweep(None, ["tune.num_samples=3"])  # digits ASHA: continuous keys only
    assert TrialNames(spec)(type("T", (), {"config": {"loss.tau1": 0.13}, "trial_id": "ab_00001"})) == "ab_00001"
    assert all("/" not in key for key in parameter_columns(spec))


@pytest.mark.parametrize("path", [p for p in SWEEPS if "asha" in p.name], ids=lambda p: p.name)
def test_the_asha_sweeps_checkpoint_at_every_rung(path):
    """A trial stopped at a rung has its rung's metrics in a checkpoint (hence in MLflow), whatever
    ray.checkpoint_every; the CIFAR sweep writes its 214 MiB ResNet-50 state every 10 epochs and uploads it
    while training goes on (bench/checkpoint_cadence.py: ~1% of a trial's training)."""
    spec = load_sweep(path, ["tune.grace_period=3"])  # rungs that are no multiple of checkpoint_every
    trial = spec.trial_config({}, "t")
    assert set(spec.evaluation_epochs()) <= set(trial.ray.checkpoint_at_epochs)
    assert spec.evaluation_epochs()[0] == 3
    if path.name == "cifar100_resnet50_asha.yaml":
        assert trial.ray.checkpoint_every == 10 and trial.ray.checkpoint_upload == "async"


def test_trial_drivers_take_a_driver_slot_only_where_the_cluster_declares_one(tmp_path):
    from pipeline.cluster import TRIAL_DRIVER_SLOT, ClusterMaximum
    from tune.sweep import DRIVER_MEMORY, trial_bundles, trial_resources

    def maximum(head: dict) -> ClusterMaximum:
        path = tmp_path / f"cluster-{len(head)}.yaml"
        path.write_text(yaml.safe_dump({"max_workers": 2, "head_node_type": "head", "available_node_types": {
            "head": {"resources": head}, "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2}}}))
        return ClusterMaximum.from_config(path)

    spec, pinned, plain = load_sweep(None), maximum({"CPU": 0, TRIAL_DRIVER_SLOT: 2}), maximum({"CPU": 0})
    workers = [{"CPU": spec.base.ray.cpus_per_worker}] * spec.base.ray.num_workers
    assert trial_resources(spec)[0] == trial_resources(spec, plain)[0] == {"memory": DRIVER_MEMORY}
    assert trial_bundles(spec, plain) == workers  # a driver taking no CPU places no bundle of its own
    assert trial_resources(spec, pinned)[0] == {"memory": DRIVER_MEMORY, TRIAL_DRIVER_SLOT: 1.0}
    assert trial_bundles(spec, pinned) == [{TRIAL_DRIVER_SLOT: 1.0}, *workers]
    assert pinned.problem(trial_bundles(spec, pinned) * 2) is None
    assert "2 varcon_trial_driver" in pinned.problem(trial_bundles(spec, pinned) * 3)  # the head hosts 2 drivers
    with_cpu = load_sweep(None, ["tune.trial_driver_cpus=1"])
    assert trial_bundles(with_cpu, pinned)[0] == {"CPU": 1.0, TRIAL_DRIVER_SLOT: 1.0}
    assert pinned.problem(trial_bundles(with_cpu, pinned))  # the head takes no CPU: no node type hosts that driver
    population = load_sweep(REPO_ROOT / "configs" / "tune" / "digits_pbt.yaml", ["ray.num_workers=2"])
    # one trial kind: a population trial is a Ray Train run of ray.num_workers workers, its driver on a kept node
    assert trial_bundles(population, pinned) == [{TRIAL_DRIVER_SLOT: 1.0}, *workers[:1] * 2]
    assert population.trial_config({"loss.tau1": 0.1, "loss.eps": 0.02}, "t1").ray.num_workers == 2
