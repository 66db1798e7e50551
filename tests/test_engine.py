"""The plain-PyTorch engine, without Ray."""
import math

import pytest
import torch

from pipeline import engine
from pipeline.config import load_config


def test_engine_trains_without_ray(digits_files):
    config = load_config(None, ["optim.epochs=2", "optim.warmup_epochs=1", "ray.num_workers=1"])
    reports = []
    engine.fit(config, digits_files, torch.device("cpu"), lambda epoch, m, _: reports.append((epoch, m)))
    assert [epoch for epoch, _ in reports] == [0, 1, 2]
    assert set(reports[0][1]) == {"knn_top1_k20", "knn_top1_k200"}
    final = reports[-1][1]
    for key in ("train_loss", "train_kl", "train_nll", "train_tau2_mean", "train_confidence_mean", "lr"):
        assert math.isfinite(final[key])
    assert final["train_loss"] < reports[1][1]["train_loss"]
    assert 0.08 <= final["train_tau2_mean"] <= 0.12


def test_warmup_then_cosine_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = engine.warmup_cosine(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5) and lrs[11] < 0.05
