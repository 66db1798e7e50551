"""The plain-PyTorch engine, without Ray."""
import math

import pytest
import torch

from pipeline import engine
from pipeline.config import load_config
from pipeline.models import unwrap


def test_engine_trains_without_ray(digits_files):
    config = load_config(None, ["optim.epochs=2", "optim.warmup_epochs=1", "ray.num_workers=1"])
    reports = []
    engine.fit(config, digits_files, torch.device("cpu"), lambda epoch, m, _: reports.append((epoch, m)))
    assert [epoch for epoch, _ in reports] == [0, 1, 2]
    assert set(reports[0][1]) == {"val_knn_top1_k20", "val_knn_top1_k200", "initial_eval_fraction", "eval_time_s"}
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


# crops, flips and colour all draw by (seed, epoch, sample index) (pipeline.data.crops, augment), so a resume must
# repeat every augmentation exactly
DETERMINISTIC = ["ray.num_workers=1", "optim.epochs=3", "optim.global_batch_size=256", "data.grayscale_prob=0.2",
                 "eval.every_epochs=10", "eval.linear_probe_epochs=0", "eval.few_shot_episodes=0"]


class Interrupted(Exception):
    pass


def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run(digits_files):
    from pipeline import checkpoint

    config = load_config(None, DETERMINISTIC)
    device = torch.device("cpu")
    reference = engine.fit(config, digits_files, device, lambda *_: None)

    saved = {}

    def stop_after_two(epoch, metrics, training):
        if epoch == 2:
            saved["state"] = checkpoint.capture(training, epoch, {"name": "run-123"})
            raise Interrupted

    with pytest.raises(Interrupted):
        engine.fit(config, digits_files, device, stop_after_two)
    state = saved["state"]
    assert state["epoch"] == 2 and state["loader_epoch"] == 2 and state["config"] == {"name": "run-123"}

    epochs = []
    resumed = engine.fit(config, digits_files, device, lambda epoch, m, t: epochs.append(epoch), resume=state)
    assert epochs == [3]
    for (name, a), (_, b) in zip(unwrap(reference.model).state_dict().items(),
                                 unwrap(resumed.model).state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.scheduler.last_epoch == reference.scheduler.last_epoch


class Preempted(Exception):
    pass


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
def test_a_resume_within_an_epoch_skips_the_trained_batches_and_matches_an_uninterrupted_run(digits_files, tmp_path,
                                                                                             loader):
    from pipeline import checkpoint

    config = load_config(None, [*DETERMINISTIC, f"data.loader={loader}"])
    device = torch.device("cpu")
    reference_metrics = {}
    reference = engine.fit(config, digits_files, device, lambda e, m, _: reference_metrics.update({e: m}))
    steps = len(reference.train_batches)
    assert steps >= 3  # a step to stop after, and one after it

    calls = []

    def preempt_in_epoch_two(progress, training):
        calls.append((progress.epoch, progress.step))
        if progress.epoch == 2 and progress.step == 2:
            state = checkpoint.capture(training, progress.epoch - 1, {"name": "run-123"}, progress)
            checkpoint.save(tmp_path, state, checkpoint.RunRecord("id", "key", "digest"))
            raise Preempted

    with pytest.raises(Preempted):
        engine.fit(config, digits_files, device, lambda *_: None, mid_epoch=preempt_in_epoch_two, mid_epoch_every=1)
    assert calls == [(1, step) for step in range(1, steps)] + [(2, 1), (2, 2)]  # never after an epoch's last step
    state = checkpoint.load(tmp_path)  # weights_only: the progress is plain values and tensors
    assert state["format_version"] == checkpoint.MID_EPOCH_FORMAT and state["epoch"] == 1
    assert state["loader_epoch"] == 1 and state["progress"]["step"] == 2  # the pass of epoch 2 (FFCV counts from 0)

    resumed_metrics, seen = {}, []
    resumed = engine.fit(config, digits_files, device, lambda e, m, _: resumed_metrics.update({e: m}), resume=state,
                         mid_epoch=lambda progress, _: seen.append((progress.epoch, progress.step)),
                         mid_epoch_every=1)
    assert list(resumed_metrics) == [2, 3]
    assert seen[0] == (2, 3)  # the hook goes on at the step after the one stored
    for (name, a), (_, b) in zip(unwrap(reference.model).state_dict().items(),
                                 unwrap(resumed.model).state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=name)
    for epoch in (2, 3):  # the interrupted epoch's means cover all its steps, as an uninterrupted epoch's do
        for key in ("train_loss", "train_kl", "train_nll", "lr"):
            assert resumed_metrics[epoch][key] == pytest.approx(reference_metrics[epoch][key], rel=1e-5), key
    assert resumed.scheduler.last_epoch == reference.scheduler.last_epoch


def test_an_epoch_state_is_written_in_the_format_before_mid_epoch_states(digits_files):
    from pipeline import checkpoint

    config = load_config(None, DETERMINISTIC[:1] + ["optim.epochs=1", "optim.warmup_epochs=0"])
    training = engine.build_training(config, digits_files, torch.device("cpu"))
    state = checkpoint.capture(training, 1, {})
    assert state["format_version"] == 2 and "progress" not in state  # what a rolled-back version reads
    assert checkpoint.progress_of(state, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="checkpoint format 4 is not one of"):
        checkpoint.restore(training, {**state, "format_version": 4})


def test_checkpoint_round_trips_through_disk_with_weights_only(digits_files, tmp_path):
    from pipeline import checkpoint
    from pipeline.record import RunRecord

    config = load_config(None, DETERMINISTIC[:1] + ["optim.epochs=1", "optim.warmup_epochs=0"])
    training = engine.build_training(config, digits_files, torch.device("cpu"))
    record = RunRecord("run-abc", "key", "digest", epoch=1)
    record.add(1, {"train_loss": 0.5})
    checkpoint.save(tmp_path, checkpoint.capture(training, 1, {"name": "abc"}), record)
    loaded = checkpoint.load(tmp_path)  # torch.load(weights_only=True) inside
    assert loaded["epoch"] == 1 and loaded["config"] == {"name": "abc"}
    assert checkpoint.load_record(tmp_path) == record
    other = engine.build_training(config, digits_files, torch.device("cpu"))
    assert checkpoint.restore(other, loaded) == 1


def test_final_evaluation_reports_probe_fewshot_and_dispersion(digits_files):
    config = load_config(None, ["ray.num_workers=1", "optim.epochs=1", "optim.warmup_epochs=0",
                                "eval.linear_probe_epochs=5", "eval.few_shot_episodes=20"])
    reports = {}
    engine.fit(config, digits_files, torch.device("cpu"), lambda epoch, m, _: reports.update({epoch: m}))
    final = reports[1]
    for key in ("test_probe_top1", "test_probe_top5", "val_probe_top1", "test_fewshot_5way_1shot",
                "test_fewshot_5way_5shot", "test_dispersion_intra_cos", "test_dispersion_inter_cos",
                "test_knn_top1_k20", "val_knn_top1_k20"):
        assert key in final
    assert 0.5 < final["test_probe_top1"] <= final["test_probe_top5"] <= 1.0
    assert 0.2 < final["test_fewshot_5way_1shot"] <= 1.0
    # dispersion's values are checked on constructed features in test_evaluation


def test_a_non_finite_loss_raises_before_its_epoch_is_reported(digits_files):
    config = load_config(None, DETERMINISTIC)
    reported = []

    def poison_after_epoch_1(epoch, metrics, training):
        reported.append(epoch)
        if epoch == 1:
            with torch.no_grad():
                next(training.model.parameters()).fill_(float("nan"))

    with pytest.raises(engine.NonFiniteLossError, match="training loss became nan at epoch 2: lower optim.lr"):
        engine.fit(config, digits_files, torch.device("cpu"), poison_after_epoch_1)
    assert reported == [0, 1]


def test_the_reference_schedule_matches_supcontrast_formulas():
    """cosine_per=epoch with a floor and an absolute warm-up start, against SupContrast's adjust_learning_rate and
    warmup_learning_rate written out here (epochs counted from 1, warm-up per iteration)."""
    lr, epochs, warm, per_epoch, warmup_from, floor = 0.5, 12, 3, 5, 0.01, 1e-3
    eta_min = lr * floor

    def reference(epoch: int, batch: int) -> float:
        value = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
        if epoch <= warm:
            warmup_to = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * warm / epochs)) / 2
            p = (batch + (epoch - 1) * per_epoch) / (warm * per_epoch)
            value = warmup_from + p * (warmup_to - warmup_from)
        return value

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    schedule = engine.warmup_cosine(optimizer, warm * per_epoch, epochs * per_epoch, per_epoch,
                                    warmup_start_lr=warmup_from, min_lr_ratio=floor, cosine_per="epoch")
    for epoch in range(1, epochs + 1):
        for batch in range(per_epoch):
            assert optimizer.param_groups[0]["lr"] == pytest.approx(reference(epoch, batch), rel=1e-12), (epoch, batch)
            optimizer.step()
            schedule.step()


def test_evaluation_settings_never_change_the_trained_weights(digits_files):
    """Evaluating every epoch with both probes (the reference probe trains on the frozen encoder through the
    training loader) leaves the same weights and BatchNorm statistics as evaluating only at the end."""
    from pipeline import checkpoint

    def final_state(overrides):
        saved = {}
        config = load_config(None, DETERMINISTIC + ["optim.epochs=2", *overrides])
        engine.fit(config, digits_files, torch.device("cpu"),
                   lambda epoch, m, t: saved.update(state=checkpoint.capture(t, epoch, {})))
        return saved["state"]["model"]

    lean = final_state(["eval.initial_fraction=0", "eval.at_epochs=[2]"])
    busy = final_state(["eval.every_epochs=1", "eval.initial_fraction=0.5", "eval.test_every_epochs=1",
                        "eval.probe=both", "eval.reference_probe_epochs=1", "eval.linear_probe_epochs=2",
                        "eval.few_shot_episodes=5"])
    assert lean.keys() == busy.keys()
    for name in lean:
        assert torch.equal(lean[name], busy[name]), name


def test_the_monitor_follows_validation_whatever_the_test_split_holds(digits_files, tmp_path):
    """Two trainings that differ only in their test file: every value that selects (the monitor of each
    epoch's report) is the same, while the test metrics differ."""
    from dataclasses import replace

    from pipeline.data import prepare_dataset
    from pipeline.names import MONITOR, monitor_source
    from pipeline.record import RunRecord

    config = load_config(None, DETERMINISTIC + ["optim.epochs=2", "eval.every_epochs=1", "eval.test_every_epochs=1"])
    other = load_config(None, ["data.dataset=synthetic", "data.num_classes=10", "data.test_samples=120"]).data
    foreign_test = replace(digits_files, test=prepare_dataset(other, tmp_path, log=lambda *_: None).test,
                           num_test=120)

    def reports(files):
        record, found = RunRecord("run", "key", "identity"), []

        def collect(epoch, metrics, _):
            record.add(epoch, metrics)
            record.epoch = epoch
            found.append(record.report(monitor_source(config.eval)))

        engine.fit(config, files, torch.device("cpu"), collect)
        return found

    own, foreign = reports(digits_files), reports(foreign_test)
    assert [r[MONITOR] for r in own] == [r[MONITOR] for r in foreign]
    assert [r[MONITOR] for r in own] == [r["val_knn_top1_k20"] for r in own]
    assert own[-1]["test_knn_top1_k20"] != foreign[-1]["test_knn_top1_k20"]


def test_the_gradient_norm_is_the_mean_norm_of_each_steps_gradient():
    """train_grad_norm against a naive loop: the same two steps on a copy of the model, ||g||_2 summed by hand in
    float64 over every parameter's gradient after backward, averaged over the steps."""
    import copy

    from pipeline.data.augment import ColorAugment
    from pipeline.losses import build_loss
    from pipeline.models import build_model

    config = load_config(None, ["ray.num_workers=1", "optim.global_batch_size=16"])
    torch.manual_seed(0)
    model = build_model(config, num_classes=10).to(memory_format=torch.channels_last)
    naive_model = copy.deepcopy(model)
    augment = ColorAugment([0.5] * 3, [0.25] * 3, 0.4, 0.8, 0.2, seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (16, 3, 32, 32), generator=gen, dtype=torch.uint8),
                torch.randint(0, 256, (16, 3, 32, 32), generator=gen, dtype=torch.uint8),
                torch.randint(0, 10, (16,), generator=gen), torch.arange(16) + 16 * step) for step in range(2)]
    loss_fn = build_loss(config.loss, 10)

    def optimiser_of(module):
        optimizer = engine.build_optimizer(module, config.optim)
        return optimizer, engine.warmup_cosine(optimizer, 2, 8, 4)

    metrics = engine.train_one_epoch(model, batches, augment, loss_fn, *optimiser_of(model), torch.device("cpu"))
    optimizer, scheduler = optimiser_of(naive_model)
    norms = []
    for view1, view2, labels, index in batches:
        x = torch.cat([augment(view1, 1, index, view=0), augment(view2, 1, index, view=1)])
        loss, _ = loss_fn(naive_model(x), torch.cat([labels, labels]))
        optimizer.zero_grad()
        loss.backward()
        norms.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in naive_model.parameters()
                                   if p.grad is not None)))
        optimizer.step()
        scheduler.step()
    assert norms[0] != pytest.approx(norms[1], rel=1e-3)  # two different steps: the mean is over both
    assert metrics["train_grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-4)


def test_a_final_evaluation_on_validation_never_reads_the_test_split(digits_files, tmp_path):
    """eval.final_split=val (a search trial): the test file is gone and the training still ends, with the final
    dispersion, few-shot episodes, probe and plot features on validation and no test metric at all."""
    from dataclasses import replace

    from pipeline.data import DataError

    one_epoch = DETERMINISTIC + ["optim.epochs=1", "optim.warmup_epochs=0"]
    config = load_config(None, one_epoch + ["eval.final_split=val", "eval.few_shot_episodes=5",
                                            "eval.linear_probe_epochs=2"])
    files = replace(digits_files, test=str(tmp_path / "no-such-test.beton"))
    reports, final = [], []
    engine.fit(config, files, torch.device("cpu"), lambda epoch, metrics, _: reports.append(metrics),
               on_final_features=final.append)
    last = reports[-1]
    assert not [key for key in last if key.startswith("test_")]
    assert {"val_knn_top1_k20", "val_probe_top1", "val_dispersion_intra_cos", "val_fewshot_5way_1shot"} <= set(last)
    (features,) = final
    assert features.split == "val" and len(features.labels) == digits_files.num_val
    with pytest.raises(DataError, match="no-such-test.beton does not exist"):  # on the test split it is read
        engine.fit(load_config(None, one_epoch), files, torch.device("cpu"), lambda *_: None)
