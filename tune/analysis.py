"""What a finished sweep says about its space, for the parent MLflow run: hyperparameter importance for the
monitor (Optuna's fANOVA evaluator over the trials as an Optuna study), a parallel-coordinates plot of the sampled
values coloured by the monitor, and the temperature schedules (tau1 and eps per epoch) of the best trials.

Which monitor value a trial contributes: under ASHA the value at the first rung (``grace_period``), the one
epoch every trial reached, so stopped and finished trials are compared at the same point; under FIFO the final
value. Under PBT/PB2 no importance is computed: the values change during training (each trial's schedule is its
lineage, logged per trial as ``discovered_schedule.yaml``), so its initial values do not explain its result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tune.spec import REPLICATE, Param, SweepSpec


@dataclass
class Importance:
    scores: dict[str, float]  # key -> importance (sums to 1), most important first
    basis: str  # which monitor values were compared, and how many trials
    note: str = ""  # why nothing was computed

    def table(self) -> str:
        if not self.scores:
            return f"no importance: {self.note}\n"
        width = max(len(k) for k in self.scores)
        lines = [f"hyperparameter importance for the monitor ({self.basis}; Optuna fANOVA)"]
        lines += [f"{key.ljust(width)}  {value:.3f}" for key, value in self.scores.items()]
        return "\n".join(lines) + "\n"


def label(value) -> str:
    return str(value.get("name", value)) if isinstance(value, dict) else str(value)


def trial_values(spec: SweepSpec, rows: list, records: dict) -> tuple[list[tuple[dict, float]], str]:
    """``[(sampled values, monitor value)]`` of the trials compared, and what they are (see the module)."""
    s = spec.settings
    if s.scheduler == "asha":
        epoch = s.grace_period
        found = []
        for row in rows:
            record = records.get(row.trial_id)
            if record is not None and record.epoch >= epoch:  # it reached the rung
                value = record.monitor(monitor_key(spec), epoch)
                if math.isfinite(value):
                    found.append((row.sampled, value))
        return found, f"{s.metric} at epoch {epoch} (ASHA's first rung), {len(found)} trials"
    found = [(row.sampled, row.metric) for row in rows if row.status.completed and math.isfinite(row.metric)]
    return found, f"final {s.metric}, {len(found)} completed trials"


def monitor_key(spec: SweepSpec) -> str:
    from pipeline.names import monitor_source

    return monitor_source(spec.base.eval)


def _distribution(p: Param, observed: list):
    import optuna.distributions as d

    if p.type in ("choice", "grid"):
        return d.CategoricalDistribution(sorted({label(v) for v in p.values}))
    low, high = min([p.low, *observed]), max([p.high, *observed])
    if p.type == "randint":
        return d.IntDistribution(int(low), int(high))
    return d.FloatDistribution(low, high, log=p.type == "loguniform")


def importance(spec: SweepSpec, rows: list, records: dict) -> Importance:
    """fANOVA importance of each space key for the monitor (see the module for which values)."""
    if spec.population_based:
        return Importance({}, "", "population-based training changes the values during training; the schedules "
                                  "each trial went through are logged with it (discovered_schedule.yaml)")
    compared, basis = trial_values(spec, rows, records)
    keys = [p for p in spec.space if len({label(v[p.key]) for v, _ in compared if p.key in v}) > 1]
    if len(compared) < 3 or not keys:
        return Importance({}, basis, f"{len(compared)} trials with a monitor value and {len(keys)} varied keys: "
                                     f"at least 3 and 1 are needed")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {p.key: _distribution(p, [v[p.key] for v, _ in compared if p.type not in ("choice", "grid")])
                     for p in keys}
    study = optuna.create_study(direction="maximize" if spec.settings.mode == "max" else "minimize")
    for values, metric in compared:
        params = {p.key: label(values[p.key]) if p.type in ("choice", "grid") else values[p.key] for p in keys}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=metric))
    scores = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=spec.settings.seed))
    return Importance(dict(scores), basis)


def parallel_coordinates_plot(spec: SweepSpec, rows: list, records: dict, path: Path) -> bool:
    """One line per compared trial across one axis per varied key (scaled to its range; log keys in log
    space; categories in order), coloured by the monitor. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared, basis = trial_values(spec, rows, records)
    keys = [p for p in spec.space if p.key != REPLICATE and len({label(v.get(p.key)) for v, _ in compared}) > 1]
    if len(compared) < 2 or not keys:
        return False

    def position(p: Param, value) -> float:
        if p.type in ("choice", "grid"):
            labels = sorted({label(v) for v in p.values})
            return labels.index(label(value)) / max(1, len(labels) - 1)
        low, high, x = float(p.low), float(p.high), float(value)
        if p.type == "loguniform":
            low, high, x = math.log(low), math.log(high), math.log(max(x, 1e-300))
        return (x - low) / (high - low) if high > low else 0.5

    metrics = [m for _, m in compared]
    low, high = min(metrics), max(metrics)
    figure, axes = plt.subplots(figsize=(1.8 * len(keys) + 2, 4.5))
    colours = plt.get_cmap("viridis")
    for values, metric in sorted(compared, key=lambda c: c[1]):
        shade = (metric - low) / (high - low) if high > low else 1.0
        axes.plot(range(len(keys)), [position(p, values[p.key]) for p in keys], color=colours(shade), alpha=0.8)
    axes.set_xticks(range(len(keys)), [p.key for p in keys], rotation=20, ha="right")
    axes.set_yticks([0, 1], ["low", "high"])
    for i in range(len(keys)):
        axes.axvline(i, color="grey", linewidth=0.5)
    bar = figure.colorbar(plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(low, high)), ax=axes)
    bar.set_label(basis)
    axes.set_title(f"sweep {spec.settings.name}: sampled values against the monitor")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def best_schedules_plot(spec: SweepSpec, rows: list, records: dict, path: Path, best: int = 3) -> bool:
    """tau1 and eps per epoch of the ``best`` completed trials by the monitor (from their run records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted((r for r in rows if r.status.completed and math.isfinite(r.metric) and r.trial_id in records),
                    key=lambda r: r.metric, reverse=spec.settings.mode == "max")[:best]
    if not ranked:
        return False
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for row in ranked:
        history = records[row.trial_id].history()
        for axes, key in ((top, "tau1"), (bottom, "eps")):
            points = history.get(key, [])
            axes.plot([e for e, _ in points], [v for _, v in points], marker=".",
                      label=f"{row.trial_id} ({spec.settings.metric} {row.metric:.3f})")
    top.set_ylabel("tau1")
    bottom.set_ylabel("eps")
    bottom.set_xlabel("epoch")
    top.legend(fontsize=8)
    top.set_title(f"sweep {spec.settings.name}: temperature schedules of the best trials")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_analysis(spec: SweepSpec, rows: list, records: dict, folder: Path) -> Importance:
    """``importance.txt``/``importance.csv`` and the two plots into ``folder``; returns the importance."""
    found = importance(spec, rows, records)
    (folder / "importance.txt").write_text(found.table())
    (folder / "importance.csv").write_text("key,importance\n" + "".join(f"{k},{v}\n" for k, v in found.scores.items()))
    parallel_coordinates_plot(spec, rows, records, folder / "parallel_coordinates.png")
    best_schedules_plot(spec, rows, records, folder / "best_schedules.png")
    return found
