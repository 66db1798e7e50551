"""A sweep's analysis on synthetic trials whose monitor depends on one key only: fANOVA must find that key, ASHA
sweeps must be compared at their first rung, and the plots must be drawn."""
import math
import random

from pipeline.record import RunRecord
from pipeline.run_status import COMPLETED
from tune.analysis import importance, write_analysis
from tune.results import TrialRow
from tune.spec import load_sweep


def synthetic_trials(spec, count=40, seed=0):
    """Rows sampled inside the space; the final monitor follows optim.lr, the epoch-2 monitor (in each trial's
    record) follows optim.weight_decay; tau1/eps curves per epoch."""
    rng = random.Random(seed)
    rows, records = [], {}
    for i in range(count):
        values = {}
        for p in spec.space:
            if p.type == "choice":
                values[p.key] = rng.choice(p.values)
            elif p.type == "loguniform":
                values[p.key] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                values[p.key] = rng.uniform(p.low, p.high)
        final = 1.0 - abs(math.log(values["optim.lr"] / 0.3)) + rng.gauss(0, 0.01)
        early = 1.0 - abs(math.log(values["optim.weight_decay"] / 1e-4)) + rng.gauss(0, 0.01)
        trial_id = f"t{i:02d}"
        record = RunRecord("run", trial_id, "x", epoch=6)
        for epoch in range(1, 7):
            record.add(epoch, {"tau1": values["loss.tau1"] * (1 - epoch / 12), "eps": values["loss.eps"],
                               "val_knn_top1_k20": early if epoch == 2 else final})
        rows.append(TrialRow(trial_id, values, 6, final, COMPLETED, f"run{i}"))
        records[trial_id] = record
    return rows, records


def test_fanova_finds_the_key_the_final_monitor_depends_on_and_the_plots_are_drawn(tmp_path):
    spec = load_sweep("configs/tune/digits_asha.yaml", ["tune.scheduler=fifo"])
    rows, records = synthetic_trials(spec)
    found = write_analysis(spec, rows, records, tmp_path)
    top, score = next(iter(found.scores.items()))
    assert top == "optim.lr" and score > 0.5, found.scores
    assert "final monitor_top1, 40 completed trials" in (tmp_path / "importance.txt").read_text()
    assert (tmp_path / "importance.csv").read_text().splitlines()[1].startswith("optim.lr,")
    for plot in ("parallel_coordinates.png", "best_schedules.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_asha_trials_are_compared_at_the_first_rung_and_pbt_gets_none():
    spec = load_sweep("configs/tune/digits_asha.yaml", ["tune.grace_period=2"])
    rows, records = synthetic_trials(spec)
    found = importance(spec, rows, records)
    assert next(iter(found.scores)) == "optim.weight_decay", found.scores  # the epoch-2 values, not the final
    assert found.basis == "monitor_top1 at epoch 2 (ASHA's first rung), 40 trials"
    pbt = load_sweep("configs/tune/digits_pbt.yaml")
    assert not importance(pbt, rows, records).scores and "changes the values during training" in \
        importance(pbt, rows, records).note
