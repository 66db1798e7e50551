"""Ray Tune's population schedulers, with no exploit at a trial's last epoch.

PBT/PB2 perturb whenever ``perturbation_interval`` epochs have passed, the last epoch included when ``optim.epochs``
is a multiple of it (8 epochs, every 2). An exploit there trains nothing: the receiver restarts from the donor's
final checkpoint and ends at once, so its run would end holding the donor's weights and records, not its own
lineage. Here a result of the last epoch only continues: the trial ends with the weights it trained.
"""
from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2


class _KeepsTheLastEpoch:
    """``on_trial_result`` without a perturbation at ``last_epoch`` (mixed into a PBT scheduler)."""

    def __init__(self, *args, last_epoch: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class PopulationWithinTraining(_KeepsTheLastEpoch, PopulationBasedTraining):
    """PBT that perturbs only while epochs remain."""


class PB2WithinTraining(_KeepsTheLastEpoch, PB2):
    """PB2 that perturbs only while epochs remain."""
