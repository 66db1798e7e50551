"""The per-epoch console line and the driver-side printer (the forwarding itself is checked by the end-to-end
trainings, whose stdout holds one line per epoch)."""
from pipeline.console import EpochPrinter, epoch_line

REPORT = {"epoch": 3, "train_loss": 4.10214, "train_kl": 0.02131, "train_nll": 4.08083, "train_tau2_mean": 0.09981,
          "val_knn_top1_k20": 0.81428, "images_per_s": 2210.4, "epoch_time_s": 2.06, "monitor_top1": 0.81428}


def test_an_epoch_line_names_loss_terms_tau2_the_monitor_with_its_split_speed_time_and_eta():
    line = epoch_line(REPORT, 15, "val_knn_top1_k20", 25.4)
    assert line == ("epoch  3/15  loss 4.1021 (kl 0.0213, nll 4.0808)  tau2 0.0998  val_knn_top1_k20 81.43%  "
                    "2210 img/s  2.1 s  ETA 00:00:25")
    supcon = {k: v for k, v in REPORT.items() if k not in ("train_kl", "train_nll", "train_tau2_mean")}
    assert epoch_line(supcon, 15, None, None) == "epoch  3/15  loss 4.1021  2210 img/s  2.1 s"
    assert epoch_line({"epoch": 0, "val_knn_top1_k20": 0.5}, 9, "val_knn_top1_k20", None) == \
        "epoch 0/9  val_knn_top1_k20 50.00% (untrained)"


def test_the_printer_estimates_the_rest_from_the_epochs_seen_and_marks_a_replayed_epoch(monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 130.0])
    monkeypatch.setattr("pipeline.console.time.monotonic", lambda: next(clock))
    lines = []
    printer = EpochPrinter(5, "val_knn_top1_k20", lines.append)
    for epoch in (0, 1, 2, 2):
        printer({"epoch": epoch, "train_loss": 1.0, "epoch_time_s": 10.0} if epoch else {"epoch": 0})
    assert [line.split()[1] for line in lines] == ["0/5", "1/5", "2/5", "2/5"]
    assert lines[0].endswith("0/5") and "ETA 00:00:40" in lines[1]  # 10 s an epoch (from its own time), 4 left
    assert "ETA 00:00:30" in lines[2] and lines[3].endswith("(again: replayed after a restart from the last "
                                                            "checkpoint)")


def test_a_preemption_report_is_one_line_and_no_epoch():
    lines = []
    printer = EpochPrinter(5, "val_knn_top1_k20", lines.append)
    printer({"epoch": 1, "train_loss": 1.0, "epoch_time_s": 10.0})
    printer({"epoch": 1, "train_loss": 1.0, "epoch_time_s": 10.0, "preemption_step": 40, "checkpoint_rank": -1.0})
    printer({"epoch": 2, "train_loss": 0.9, "epoch_time_s": 10.0})
    assert lines[1] == ("preemption notice: checkpointed within epoch 2 after step 40; the run resumes there on a "
                        "new node")
    assert "again" not in lines[2]  # epoch 2 is printed for the first time
