"""Paired verdicts against a sweep's baseline (tune.verdicts): the t-interval, Holm's adjustment, the pairing by
replicate and the files a sweep writes, on fixed numbers and synthetic trial rows (no Ray)."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.config import REPO_ROOT, ConfigError
from pipeline.run_status import COMPLETED, RunStatus
from tune.results import TrialRow, compare, comparison_metrics, write_comparisons
from tune.spec import REPLICATE, load_sweep
from tune.verdicts import HURTS, NO_EVIDENCE, PAYS, against, holm, paired_interval, paired_verdicts

COMPARISON = REPO_ROOT / "configs" / "tune" / "digits_loss_comparison.yaml"


def test_the_interval_is_the_paired_t_interval():
    mean, low, high, p = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) from a t table, sd = sqrt(2.5)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-5)
    sem = stats.sem([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (low, high) == pytest.approx(stats.t.interval(0.95, 4, loc=3.0, scale=sem))
    x, b = np.array([0.81, 0.84, 0.80, 0.86, 0.83]), np.array([0.80, 0.80, 0.79, 0.82, 0.80])
    assert paired_interval(list(x - b))[3] == pytest.approx(stats.ttest_rel(x, b).pvalue)


def test_holm_steps_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, float("nan"), 0.6])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)


def rows_of(values: dict[str, list[float | None]], metric: str = "val_knn_top1_k20") -> list[TrialRow]:
    """Trial rows of recipes over replicates 0, 1, ...; None: that replicate failed."""
    rows = []
    for recipe, per_seed in values.items():
        for replicate, value in enumerate(per_seed):
            status = COMPLETED if value is not None else RunStatus.failed("boom")
            rows.append(TrialRow(f"{recipe}{replicate}", {"recipe": {"name": recipe}, REPLICATE: replicate}, 1,
                                 value or float("nan"), status, final={metric: value} if value is not None else {}))
    return rows


def test_configurations_are_paired_by_seed_and_judged_against_the_minimum_gain():
    base = [0.80, 0.82, 0.78, 0.81, 0.79]
    rows = rows_of({"a": base, "better": [v + g for v, g in zip(base, (0.05, 0.04, 0.06, 0.05, 0.05))],
                    "worse": [v - g for v, g in zip(base, (0.06, 0.05, 0.07, 0.06, 0.06))],
                    "noise": [v + g for v, g in zip(base[:4], (0.02, -0.03, 0.01, -0.01))] + [None]})
    # the last replicate of "noise" failed: its pair is dropped
    found = {v.configuration: v for v in paired_verdicts(rows, against(rows, "recipe=a"), ["val_knn_top1_k20"],
                                                         min_gain=0.01)}
    assert set(found) == {"recipe=better", "recipe=worse", "recipe=noise"}
    assert found["recipe=better"].verdict == PAYS and found["recipe=worse"].verdict == HURTS
    assert found["recipe=noise"].verdict == NO_EVIDENCE
    assert found["recipe=noise"].replicates == (0, 1, 2, 3) and found["recipe=noise"].dropped == 1
    assert found["recipe=better"].differences == pytest.approx((0.05, 0.04, 0.06, 0.05, 0.05))
    # three comparisons on one metric: Holm multiplies the smallest p by 3
    assert min(v.p_adjusted for v in found.values()) == pytest.approx(3 * min(v.p for v in found.values()))
    strict = paired_verdicts(rows, against(rows, "recipe=a"), ["val_knn_top1_k20"], min_gain=0.08)
    assert {v.configuration: v.verdict for v in strict}["recipe=better"] == NO_EVIDENCE  # gain below the minimum


def test_a_sweep_with_a_baseline_writes_its_verdicts_beside_the_comparison(tmp_path):
    spec = load_sweep(COMPARISON, ["tune.baseline=recipe=varcon"])
    assert spec.settings.min_gain == 0.01  # declared in the sweep file
    metric = comparison_metrics(spec)[1]
    rows = rows_of({"varcon": [0.90, 0.91, 0.89], "supcon": [0.95, 0.97, 0.94],
                    "cross_entropy": [0.90, 0.92, 0.88]}, metric)
    printed = []
    write_comparisons(spec, rows, compare(rows, comparison_metrics(spec)), tmp_path, printed.append)
    assert {p.name for p in tmp_path.iterdir()} == {"comparison.txt", "comparison.csv", "verdicts.txt",
                                                    "verdicts.csv", "verdicts.png"}
    with open(tmp_path / "verdicts.csv") as handle:
        table = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert set(table) == {"recipe=supcon", "recipe=cross_entropy"}
    assert table["recipe=supcon"]["pairs"] == "3" and float(table["recipe=supcon"]["mean_difference"]) == \
        pytest.approx(0.0533333, abs=1e-6)
    assert "paired against recipe=varcon over 3 seeds" in printed[-1]
    assert (tmp_path / "verdicts.txt").read_text().strip() in printed[-1]


@pytest.mark.parametrize("overrides, message", [
    (["tune.baseline=recipe=sgd"], "tune.baseline='recipe=sgd' is not a configuration of the grid: use one of "
                                   "'recipe=varcon', 'recipe=supcon', 'recipe=cross_entropy'"),
    (["tune.baseline=recipe=varcon", "tune.seeds=2"], "needs at least 3 seeds"),
    (["tune.baseline=recipe=varcon", "tune.min_gain=-0.1"], "tune.min_gain=-0.1 must be >= 0"),
])
def test_a_baseline_that_cannot_give_a_verdict_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(COMPARISON, overrides)


def test_a_baseline_needs_an_all_grid_space():
    with pytest.raises(ConfigError, match="every key of the space must be a grid"):
        load_sweep(None, ["tune.baseline=loss.tau1=0.1", "tune.seeds=3"])
