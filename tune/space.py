"""A sweep's search space in the forms Ray Tune's searchers and schedulers take.

- random / optuna: a define-by-run function for ``OptunaSearch`` (random = Optuna's ``RandomSampler``, optuna =
  its TPE sampler), so both honour ``below`` (``loss.eps < loss.tau1``) the same way: the dependent key is drawn
  from ``[low, min(high, partner * BELOW_MARGIN)]`` after its partner.
- grid: Tune's own variant generator over a ``param_space``: every grid value once (``tune.grid_search``), the
  other keys drawn as for PBT's population.
- ``tune.seeds`` replicates: Tune's ``Repeater`` around the Optuna searcher (it sets ``REPLICATE`` and hands the
  searcher the replicates' mean), a grid dimension over ``REPLICATE`` for the grid searcher.
- pbt / pb2: Tune domains for the initial population (``sample_from`` for ``below`` keys), PBT mutations or PB2
  bounds for the keys changed during training, and an explore function that keeps every perturbed
  configuration inside the space and its ``below`` constraints.
"""
from __future__ import annotations

import random

from tune.spec import BELOW_MARGIN, REPLICATE, Param, SweepSpec


def ordered(space: list[Param]) -> list[Param]:
    """Keys with a ``below`` partner after that partner."""
    return sorted(space, key=lambda p: bool(p.below))


class OptunaDefineByRun:
    """``trial -> None``: suggests every key of the space on an ``optuna.Trial`` (a class: Tune pickles it)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.space = ordered(spec.space)

    def __call__(self, trial) -> None:
        values = {}
        for p in self.space:
            if p.type == "choice":
                values[p.key] = trial.suggest_categorical(p.key, p.values)
            elif p.type == "randint":
                values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high))
            else:
                high = min(p.high, values[p.below] * BELOW_MARGIN) if p.below else p.high
                values[p.key] = trial.suggest_float(p.key, p.low, high, log=p.type == "loguniform")


def searcher(spec: SweepSpec):
    """Ray Tune's ``OptunaSearch`` with a random or TPE sampler, seeded by ``tune.seed``, wrapped in a
    ``Repeater`` for ``tune.seeds`` > 1; ``None`` (Tune's variant generator) for the grid."""
    import optuna
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    s = spec.settings
    if s.searcher == "grid":
        return None
    sampler = (optuna.samplers.RandomSampler(seed=s.seed) if s.searcher == "random"
               else optuna.samplers.TPESampler(seed=s.seed))
    found = OptunaSearch(space=OptunaDefineByRun(spec), metric=s.metric, mode=s.mode, sampler=sampler)
    return Repeater(found, repeat=s.seeds, set_index=True) if s.seeds > 1 else found


def trial_count(spec: SweepSpec) -> int:
    """Tune's ``num_samples``: configurations x replicates (the grid: repeats of the whole grid)."""
    s = spec.settings
    return s.num_samples if s.searcher == "grid" or spec.population_based else s.num_samples * s.seeds


def param_space(spec: SweepSpec) -> dict | None:
    """The ``param_space`` of the grid searcher and of PBT/PB2's population (``None``: Optuna suggests)."""
    from ray import tune

    if spec.population_based:
        return population_param_space(spec)
    if spec.settings.searcher != "grid":
        return None
    found = population_param_space(spec)
    if spec.settings.seeds > 1:
        found[REPLICATE] = tune.grid_search(list(range(spec.settings.seeds)))
    return found


def _domain(p: Param):
    from ray import tune

    if p.type == "grid":
        return tune.grid_search(p.values)
    if p.type == "choice":
        return tune.choice(p.values)
    if p.type == "randint":
        return tune.randint(int(p.low), int(p.high) + 1)
    return tune.loguniform(p.low, p.high) if p.type == "loguniform" else tune.uniform(p.low, p.high)


def population_param_space(spec: SweepSpec) -> dict:
    """Tune domains for PBT/PB2's initial population; ``below`` keys drawn under their partner's value."""
    from ray import tune

    space = {}
    for p in spec.space:
        if p.below:
            space[p.key] = tune.sample_from(
                lambda s, p=p: random.uniform(p.low, min(p.high, s.config[p.below] * BELOW_MARGIN)))
        else:
            space[p.key] = _domain(p)
    return space


def pbt_mutations(spec: SweepSpec) -> dict:
    return {p.key: _domain(p) for p in spec.space if p.key in spec.settings.mutate}


def pb2_bounds(spec: SweepSpec) -> dict:
    return {p.key: [p.low, p.high] for p in spec.space if p.key in spec.settings.mutate}


class ExploreWithinSpace:
    """``config -> config`` after a PBT/PB2 explore step: continuous keys clipped into ``[low, high]``, then every
    ``below`` key under its partner (a class: Tune pickles it)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.continuous = [p for p in ordered(spec.space) if p.type in ("uniform", "loguniform")]

    def __call__(self, config: dict) -> dict:
        for p in self.continuous:
            if p.key in config:
                value = min(max(config[p.key], p.low), p.high)
                if p.below and p.below in config:
                    value = min(value, config[p.below] * BELOW_MARGIN)
                config[p.key] = value
        return config
