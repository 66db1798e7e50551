"""Temperature schedules: values per epoch, validation, and the engine applying them."""
import math

import pytest
import torch

from pipeline import engine
from pipeline.config import ConfigError, load_config
from pipeline.schedules import temperatures_at


def values(overrides, epochs=5):
    config = load_config(None, [f"optim.epochs={epochs}", *overrides])
    return [temperatures_at(config.loss, e, epochs) for e in range(1, epochs + 1)]


def test_constant_keeps_the_configured_values():
    assert {(t.tau1, t.eps) for t in values(["loss.tau1=0.2", "loss.eps=0.05"])} == {(0.2, 0.05)}


def test_linear_and_cosine_go_from_start_to_end():
    linear = values(["loss.schedule.kind=linear", "loss.schedule.tau1_end=0.06", "loss.schedule.eps_end=0.0"])
    assert [t.tau1 for t in linear] == pytest.approx([0.1, 0.09, 0.08, 0.07, 0.06])
    assert [t.eps for t in linear] == pytest.approx([0.02, 0.015, 0.01, 0.005, 0.0])
    cosine = values(["loss.schedule.kind=cosine", "loss.schedule.tau1_end=0.06"])
    expected = [0.06 + 0.04 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1)]
    assert [t.tau1 for t in cosine] == pytest.approx(expected)
    assert {t.eps for t in cosine} == {0.02}  # eps_end defaults to loss.eps


def test_step_uses_equal_phases():
    step = values(["loss.schedule.kind=step", "loss.schedule.steps=3", "loss.schedule.tau1_end=0.04"], epochs=6)
    assert [t.tau1 for t in step] == pytest.approx([0.1, 0.1, 0.07, 0.07, 0.04, 0.04])


def test_piecewise_replays_values_from_their_epochs():
    steps = values(["loss.schedule.kind=piecewise", "loss.schedule.epochs=[1,3]",
                    "loss.schedule.tau1_values=[0.1,0.05]", "loss.schedule.eps_values=[0.02,0.01]"])
    assert [(t.tau1, t.eps) for t in steps] == [(0.1, 0.02)] * 2 + [(0.05, 0.01)] * 3


def test_periodic_follows_kukleva_s_cosine_with_eps_by_its_rule():
    """tau1 from loss.tau1 to the half-period bound and back every period (epoch e at t = e - 1); eps keeps
    loss.eps / loss.tau1 (ratio) or stays loss.eps (fixed)."""
    periodic = ["loss.schedule.kind=periodic", "loss.schedule.period=4", "loss.schedule.tau1_half_period=0.3"]
    ratio = values(periodic, epochs=9)
    expected = [0.3 + (0.1 - 0.3) * 0.5 * (1 + math.cos(2 * math.pi * t / 4)) for t in range(9)]
    assert [t.tau1 for t in ratio] == pytest.approx(expected)
    assert [t.tau1 for t in ratio][::2] == pytest.approx([0.1, 0.3, 0.1, 0.3, 0.1])  # bounds at each half period
    assert [t.eps for t in ratio] == pytest.approx([0.2 * tau1 for tau1 in expected])
    fixed = values([*periodic, "loss.schedule.eps_rule=fixed"], epochs=9)
    assert [t.tau1 for t in fixed] == pytest.approx(expected) and {t.eps for t in fixed} == {0.02}


def test_periodic_keys_leave_the_run_keys_of_other_schedules_as_they_were():
    """The periodic keys came after run keys existed: at their defaults they are not part of a run's identity
    (every earlier run keeps its key); set, they are."""
    from pipeline.identity import identity_digest, trajectory_settings

    plain = load_config(None, [])
    assert not any(key in trajectory_settings(plain) for key in
                   ("loss.schedule.period", "loss.schedule.tau1_half_period", "loss.schedule.eps_rule"))
    assert identity_digest(load_config(None, ["loss.schedule.eps_rule=ratio", "loss.schedule.period=0"])) == \
        identity_digest(plain)
    assert identity_digest(load_config(None, ["loss.schedule.eps_rule=fixed"])) != identity_digest(plain)


@pytest.mark.parametrize("overrides, message", [
    (["loss.schedule.kind=periodic", "loss.schedule.tau1_half_period=0.3"], "period=0 must be >= 2"),
    (["loss.schedule.kind=periodic", "loss.schedule.period=10"], "tau1_half_period must be set"),
    (["loss.schedule.kind=periodic", "loss.schedule.period=10", "loss.schedule.tau1_half_period=0.3",
      "loss.schedule.eps_rule=cubic"], "eps_rule='cubic' is unknown"),
    (["loss.schedule.kind=periodic", "loss.schedule.period=10", "loss.schedule.tau1_half_period=0.03",
      "loss.schedule.eps_rule=fixed"],
     r"reaches tau1=0.03 with eps=0.02 \(eps_rule=fixed\): tau1 - eps must stay >= 0.02"),
    (["loss.schedule.kind=periodic", "loss.schedule.period=10", "loss.schedule.tau1_half_period=0.02"],
     "reaches tau1=0.02 with eps=0.004"),
    (["loss.schedule.kind=exponential"], "loss.schedule.kind='exponential' is unknown"),
    (["loss.schedule.kind=linear", "loss.schedule.tau1_end=0.01"], "reaches tau1=0.01, eps=0.02"),
    (["loss.schedule.kind=step", "loss.schedule.steps=1"], "must be >= 2"),
    (["loss.schedule.kind=piecewise", "loss.schedule.epochs=[2]", "loss.schedule.tau1_values=[0.1]",
      "loss.schedule.eps_values=[0.0]"], "must start at 1"),
    (["loss.schedule.kind=piecewise", "loss.schedule.epochs=[1,2]", "loss.schedule.tau1_values=[0.1]",
      "loss.schedule.eps_values=[0.0]"], "equal, non-zero length"),
    (["loss.name=supcon", "loss.schedule.kind=linear"], "use loss.name=varcon"),
    (["loss.schedule.tau1_end=fast"], "must be of type float"),
])
def test_bad_schedules_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_engine_applies_the_schedule_and_reports_it(digits_files):
    config = load_config(None, ["ray.num_workers=1", "optim.epochs=2", "optim.warmup_epochs=0",
                                "loss.schedule.kind=linear", "loss.schedule.tau1_end=0.05",
                                "loss.schedule.eps_end=0.01", "eval.every_epochs=5", "eval.linear_probe_epochs=0",
                                "eval.few_shot_episodes=0"])
    reports = {}
    training = engine.fit(config, digits_files, torch.device("cpu"), lambda e, m, _: reports.update({e: m}))
    assert (reports[1]["tau1"], reports[1]["eps"]) == pytest.approx((0.1, 0.02))
    assert (reports[2]["tau1"], reports[2]["eps"]) == pytest.approx((0.05, 0.01))
    assert (training.loss_fn.tau1, training.loss_fn.eps) == pytest.approx((0.05, 0.01))
    # tau2 = tau1 - eps + 2 eps c lies in [tau1 - eps, tau1 + eps] of the epoch it was computed in
    assert 0.04 <= reports[2]["train_tau2_mean"] <= 0.06
