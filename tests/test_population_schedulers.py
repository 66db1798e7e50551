"""tune.schedulers: Ray's synchronous PBT/PB2, which perturb at every interval, except at a trial's last epoch."""
from __future__ import annotations

import pytest
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pbt import _PBTTrialState

from tune.schedulers import PB2WithinTraining, PopulationWithinTraining


class Trial:
    """What synchronous PBT reads of a trial here: its tag, status and config (hashed by identity, as Tune's)."""

    def __init__(self, tag: str) -> None:
        self.experiment_tag, self.status, self.config = tag, "RUNNING", {"loss.tau1": 0.1}


class Controller:
    """The two calls synchronous PBT makes of Tune's controller while a trial waits for the others."""

    def __init__(self, trials) -> None:
        self.trials = trials

    def get_live_trials(self):
        return self.trials

    def get_trials(self):
        return self.trials


def population(kind, last_epoch: int | None):
    """A 2-trial population perturbed every epoch; ``last_epoch=None``: Ray's own PBT."""
    common = dict(time_attr="epoch", perturbation_interval=1, metric="monitor_top1", mode="max", synch=True)
    if kind is PB2WithinTraining:
        scheduler = kind(hyperparam_bounds={"loss.tau1": [0.05, 0.3]}, last_epoch=last_epoch, **common)
    elif last_epoch is None:
        scheduler = PopulationBasedTraining(hyperparam_mutations={"loss.tau1": [0.1, 0.2]}, **common)
    else:
        scheduler = kind(hyperparam_mutations={"loss.tau1": [0.1, 0.2]}, last_epoch=last_epoch, **common)
    trials = [Trial("a"), Trial("b")]
    for trial in trials:
        scheduler._trial_state[trial] = _PBTTrialState(trial)  # what on_trial_add sets up
    return scheduler, trials


@pytest.mark.parametrize("kind", [PopulationWithinTraining, PB2WithinTraining], ids=["pbt", "pb2"])
def test_a_population_waits_at_a_perturbation_but_never_at_the_last_epoch(kind):
    scheduler, (a, b) = population(kind, last_epoch=2)
    controller = Controller([a, b])
    assert scheduler.on_trial_result(controller, a, {"epoch": 1, "monitor_top1": 0.5}) == TrialScheduler.PAUSE
    assert scheduler._trial_state[a].last_train_time == 1  # Ray's synchronous PBT: a waits for b at epoch 1
    assert scheduler.on_trial_result(controller, a, {"epoch": 2, "monitor_top1": 0.6}) == TrialScheduler.CONTINUE
    assert scheduler._trial_state[a].last_train_time == 1  # the last epoch is no perturbation: a just ends


def test_ray_s_own_pbt_would_stop_the_last_epoch_for_an_exploit():
    scheduler, (a, b) = population(PopulationWithinTraining, last_epoch=None)
    assert scheduler.on_trial_result(Controller([a, b]), a, {"epoch": 2, "monitor_top1": 0.6}) == TrialScheduler.PAUSE
