"""Paired verdicts: does a configuration beat a baseline (a sweep's, or a study's arms), seed by seed?

Replicate r of every configuration trains with seed ``seed + r`` (``tune.seeds``): the same initialisation and data
order as the baseline's replicate r, so the two are a pair and their difference d_r = x_r - b_r removes what the
seed does to both. Over the n complete pairs (both completed, both reporting the metric; a replicate without its
pair is dropped and counted):

    mean d, sd s (n - 1 in the denominator), interval  mean d +- t(0.975, n - 1) s / sqrt(n)
    p = 2 (1 - F_t(|mean d| / (s / sqrt(n)), n - 1))                         (the paired t-test)

With m comparisons on one metric (every configuration against the baseline; a study's arms against each of
its baselines), the p-values are Holm-adjusted (step-down:
p_(i) (m - i + 1), made monotone, capped at 1). Verdict, with ``tune.min_gain`` declared before the sweep:

    pays        adjusted p < 0.05, mean d > 0 and mean d >= min_gain
    hurts       adjusted p < 0.05 and mean d < 0
    no evidence otherwise

For one comparison this is "the 95% interval's lower bound > 0" (pays) or "its upper bound < 0" (hurts); the
intervals shown are the unadjusted 95% intervals. ``tune.mode: min`` metrics are compared as they are (a
positive difference is then a loss), so verdicts read the selection metric's direction only for ``max``.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

from tune.spec import REPLICATE

LEVEL = 0.95
PAYS, HURTS, NO_EVIDENCE = "pays", "hurts", "no evidence"


@dataclass(frozen=True)
class Paired:
    """One configuration against a baseline on one metric."""

    configuration: str
    baseline: str
    metric: str
    differences: tuple[float, ...]  # per complete pair, in replicate order
    replicates: tuple[int, ...]  # the replicates of those pairs
    dropped: int  # replicates of either side without a complete pair
    mean: float
    low: float
    high: float
    p: float
    p_adjusted: float = float("nan")
    verdict: str = NO_EVIDENCE


def paired_interval(differences: list[float]) -> tuple[float, float, float, float]:
    """(mean, low, high, two-sided p) of the paired t-test of ``differences`` (n >= 2; nan where undefined)."""
    from scipy import stats

    n = len(differences)
    mean = math.fsum(differences) / n
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    if sd == 0:  # every pair differs by the same amount
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    p = 2 * float(stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return mean, mean - half, mean + half, p


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (nan stays nan and does not count)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, p * (len(order) - rank)))
        adjusted[i] = running
    return adjusted


def verdict(mean: float, p_adjusted: float, min_gain: float) -> str:
    if math.isnan(p_adjusted) or p_adjusted >= 1 - LEVEL:
        return NO_EVIDENCE
    if mean > 0 and mean >= min_gain:
        return PAYS
    return HURTS if mean < 0 else NO_EVIDENCE


def paired(configuration: str, baseline: str, metric: str, mine: dict[int, float], base: dict[int, float]
           ) -> Paired | None:
    """``mine`` against ``base`` (``{replicate: value}``) over the replicates both hold; None without a pair."""
    pairs = sorted(set(mine) & set(base))
    if not pairs:
        return None
    differences = [mine[r] - base[r] for r in pairs]
    mean, low, high, p = paired_interval(differences)
    return Paired(configuration, baseline, metric, tuple(differences), tuple(pairs), len(set(mine) ^ set(base)),
                  mean, low, high, p)


def judged(found: list[Paired], min_gain: float) -> list[Paired]:
    """``found`` with Holm-adjusted p-values (within each metric: one family per metric) and verdicts."""
    out = list(found)
    for metric in dict.fromkeys(f.metric for f in found):
        members = [i for i, f in enumerate(found) if f.metric == metric]
        for i, adjusted in zip(members, holm([found[i].p for i in members])):
            out[i] = replace(found[i], p_adjusted=adjusted, verdict=verdict(found[i].mean, adjusted, min_gain))
    return out


def final_values(rows: list, configuration: str, metric: str) -> dict[int, float]:
    """``{replicate: final metric}`` of the completed replicates of ``configuration`` that report ``metric``."""
    return {int(r.sampled.get(REPLICATE) or 0): float(r.final[metric]) for r in rows
            if r.configuration == configuration and r.status.completed
            and isinstance(r.final.get(metric), (int, float)) and not math.isnan(r.final[metric])}


def paired_verdicts(rows: list, comparisons: list[tuple[str, str]], metrics: list[str], min_gain: float
                    ) -> list[Paired]:
    """Each ``(configuration, baseline)`` of ``comparisons`` over the rows (``tune.results.TrialRow``), per metric
    that both report; all comparisons on one metric are one Holm family."""
    found = []
    for metric in metrics:
        for configuration, baseline in comparisons:
            one = paired(configuration, baseline, metric, final_values(rows, configuration, metric),
                         final_values(rows, baseline, metric))
            if one is not None:
                found.append(one)
    return judged(found, min_gain)


def against(rows: list, baseline: str) -> list[tuple[str, str]]:
    """Every configuration of ``rows`` but ``baseline``, against it."""
    return [(c, baseline) for c in dict.fromkeys(r.configuration for r in rows) if c != baseline]


def verdict_table(verdicts: list[Paired], min_gain: float) -> str:
    """One line per comparison and metric: mean paired difference, 95% interval, pairs, Holm-adjusted p,
    verdict."""
    lines = [["configuration", "minus", "metric", "mean difference", f"{LEVEL:.0%} interval", "pairs", "dropped",
              "p (Holm)", f"verdict (min gain {min_gain:g})"]]
    for v in verdicts:
        lines.append([v.configuration, v.baseline, v.metric, f"{v.mean:+.4f}", f"[{v.low:+.4f}, {v.high:+.4f}]",
                      str(len(v.differences)), str(v.dropped), f"{v.p_adjusted:.3g}", v.verdict])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def write_verdicts_csv(verdicts: list[Paired], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "baseline", "metric", "mean_difference", "low", "high", "pairs", "dropped",
                         "p", "p_holm", "verdict", "differences"])
        for v in verdicts:
            writer.writerow([v.configuration, v.baseline, v.metric, v.mean, v.low, v.high, len(v.differences),
                             v.dropped, v.p, v.p_adjusted, v.verdict, " ".join(f"{d:.6g}" for d in v.differences)])


def plot_differences(verdicts: list[Paired], path: Path) -> None:
    """Per metric, each comparison's per-seed differences (dots) with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(v.metric for v in verdicts))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        shown = [v for v in verdicts if v.metric == metric]
        for y, v in enumerate(shown):
            ax.scatter(v.differences, [y] * len(v.differences), s=14, color="tab:blue", zorder=3)
            if not math.isnan(v.low):
                ax.plot([v.low, v.high], [y, y], color="black", linewidth=2)
            ax.plot([v.mean], [y], marker="|", markersize=12, color="black")
        ax.axvline(0.0, color="grey", linewidth=1, linestyle="--")
        ax.set_yticks(range(len(shown)), [f"{v.configuration}\nminus {v.baseline}: {v.verdict}" for v in shown],
                      fontsize=7)
        ax.set_xlabel(f"{metric}: paired difference", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
