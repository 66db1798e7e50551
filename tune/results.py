"""A sweep's results as tables: one row per trial (``TrialRow``), the replicates of each configuration compared
(``compare``: mean, sd and count per metric; ``tune.verdicts``: paired against a baseline), the best trial, and
the tables and CSV files the sweep writes."""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.run_status import RunStatus
from tune.spec import REPLICATE, SweepSpec
from tune.verdicts import against, paired_verdicts, plot_differences, verdict_table, write_verdicts_csv


@dataclass
class TrialRow:
    trial_id: str
    sampled: dict  # the space's values, and the replicate (``REPLICATE``) under tune.seeds
    epochs: int
    metric: float
    status: RunStatus
    run_id: str = ""
    final: dict = field(default_factory=dict)  # the last report's metrics

    @property
    def configuration(self) -> str:
        """The sampled values without the replicate: what the replicates of one configuration share."""
        return ", ".join(f"{k}={SweepSpec.label(v)}" for k, v in sorted(self.sampled.items()) if k != REPLICATE)


@dataclass
class Compared:
    """The replicates of one configuration: per metric (mean, sd, n) over those that completed."""

    configuration: str
    rows: list[TrialRow]
    stats: dict[str, tuple[float, float, int]]


def comparison_metrics(spec: SweepSpec) -> list[str]:
    """What the comparison reports per configuration: the selection metric, then the final validation and test
    kNN top-1 and the probes' test top-1."""
    k = spec.base.eval.knn_k[0]
    return [spec.settings.metric, f"val_knn_top1_k{k}", f"test_knn_top1_k{k}", "test_probe_top1",
            "test_refprobe_top1"]


def compare(rows: list[TrialRow], metrics: list[str]) -> list[Compared]:
    """Rows grouped by configuration (replicates together, first appearance order), each metric's mean, sample
    sd (nan for one value) and count over the completed replicates that report it."""
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        groups.setdefault(row.configuration, []).append(row)
    found = []
    for configuration, members in groups.items():
        stats = {}
        for name in metrics:
            values = [r.final[name] for r in members if r.status.completed and isinstance(r.final.get(name),
                                                                                               (int, float))
                      and not math.isnan(r.final[name])]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else float("nan")
                stats[name] = (statistics.fmean(values), sd, len(values))
        found.append(Compared(configuration, members, stats))
    return found


def best_trial(compared: list[Compared], metric: str, mode: str) -> TrialRow | None:
    """The best completed trial of the configuration with the best mean ``metric`` over its replicates."""
    choose = max if mode == "max" else min
    candidates = [c for c in compared if metric in c.stats and any(
        r.status.completed and r.run_id and not math.isnan(r.metric) for r in c.rows)]
    if not candidates:
        return None
    group = choose(candidates, key=lambda c: c.stats[metric][0])
    return choose([r for r in group.rows if r.status.completed and r.run_id and not math.isnan(r.metric)],
                  key=lambda r: r.metric)


def comparison_table(compared: list[Compared], metrics: list[str]) -> str:
    """One line per configuration: ``mean +- sd (n)`` of each metric that any configuration reports."""
    shown = [m for m in metrics if any(m in c.stats for c in compared)]
    lines = [["configuration", "replicates", *shown]]
    for c in compared:
        cells = []
        for name in shown:
            mean, sd, n = c.stats.get(name, (float("nan"), float("nan"), 0))
            cells.append(f"{mean:.4f} +- {sd:.4f} ({n})" if n else "-")
        lines.append([c.configuration, str(len(c.rows)), *cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def write_comparison_csv(compared: list[Compared], metrics: list[str], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "replicates", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd", "n"))])
        for c in compared:
            writer.writerow([c.configuration, len(c.rows),
                             *(v for m in metrics for v in c.stats.get(m, (float("nan"), float("nan"), 0)))])


def write_comparisons(spec: SweepSpec, rows: list[TrialRow], compared: list[Compared], folder: Path, log) -> None:
    """Under ``tune.seeds > 1`` or a grid: the configurations' mean +- sd table (``comparison.txt``/``.csv``);
    with ``tune.baseline``: the paired verdicts against it (``verdicts.txt``/``.csv``, ``verdicts.png``, see
    ``tune.verdicts``). Each table is also printed."""
    s, metrics = spec.settings, comparison_metrics(spec)
    if s.seeds > 1 or s.searcher == "grid":
        table = comparison_table(compared, metrics)
        log("\n" + table)
        (folder / "comparison.txt").write_text(table + "\n")
        write_comparison_csv(compared, metrics, folder / "comparison.csv")
    if s.baseline:
        verdicts = paired_verdicts(rows, against(rows, s.baseline), metrics, s.min_gain)
        table = verdict_table(verdicts, s.min_gain)
        log(f"\npaired against {s.baseline} over {s.seeds} seeds (tune.verdicts):\n{table}")
        (folder / "verdicts.txt").write_text(table + "\n")
        write_verdicts_csv(verdicts, folder / "verdicts.csv")
        if verdicts:
            plot_differences(verdicts, folder / "verdicts.png")


def print_trial_table(rows: list[TrialRow], metric: str, best: TrialRow | None, log) -> None:
    keys = sorted({k for r in rows for k in r.sampled})
    header = ["trial", *("replicate" if k == REPLICATE else k for k in keys), "epochs", metric, "status"]
    lines = [header]
    for r in sorted(rows, key=lambda r: r.trial_id):
        values = [SweepSpec.label(r.sampled.get(k)) for k in keys]
        lines.append([r.trial_id + (" *" if r is best else ""), *values, str(r.epochs), f"{r.metric:.4f}",
                      str(r.status)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        log("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def write_trials_csv(rows: list[TrialRow], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.sampled})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial_id", *keys, "epochs", "metric", "status", "mlflow_run_id"])
        for r in rows:
            writer.writerow([r.trial_id, *(SweepSpec.label(r.sampled.get(k)) for k in keys), r.epochs, r.metric,
                             str(r.status), r.run_id])
