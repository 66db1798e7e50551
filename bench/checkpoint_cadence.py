"""What checkpoints cost the CIFAR configs and sweeps at their cadence, and how far MLflow lags behind training.

Per run: ``saves`` checkpoints (every ``ray.checkpoint_every`` epochs, at ``ray.checkpoint_at_epochs`` (a sweep's
rungs), the last epoch), each stalling every rank for

  sync   write + upload: rank 0 captures the state and saves it to local disk, then copies it to
         ``ray.storage_path``; the other ranks wait at the report's barrier
  async  write only: Ray Train uploads in a background thread while training goes on
         (``ray.checkpoint_upload: async``)

against ``epochs`` x the epoch's step loop. MLflow gets an epoch's metrics once a checkpoint covering it is
persisted (Ray Train's controller forwards them, exactly once across restarts), so it lags training by up to
``checkpoint_every`` epochs plus one upload.

Measured here: the state of each config's model (``checkpoint.capture`` + ``save`` to local disk, median of
``--repeats``), its size and this machine's write rate. The GPU figures are the lent H200's
(``bench/trial_overhead.py``: ``GPU_FIGURES``, 0.19 s for the 213.7 MiB ResNet-50 state, i.e. its write rate);
the storage's upload rate and the ResNet-18 step rate are stated assumptions.

    python bench/checkpoint_cadence.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from trial_overhead import GPU_FIGURES, STATE_MIB, Figure

from pipeline import checkpoint, engine
from pipeline.config import REPO_ROOT, load_config, to_dict
from pipeline.models import build_model
from pipeline.record import RunRecord
from tune.spec import load_sweep

CONFIGS = ["cifar100_resnet50.yaml", "cifar100_resnet50_ce.yaml", "cifar100_resnet50_supcon.yaml",
           "cifar10_resnet18.yaml"]
SWEEPS = ["tune/cifar100_resnet50_asha.yaml"]
TRAIN_IMAGES = 50_000  # CIFAR-10/100's training split, less a sweep's validation fraction
H200_WRITE_MIB_S = STATE_MIB / GPU_FIGURES["checkpoint_write_s"].value
ASSUMED = {
    "upload_mib_s": Figure(500.0, "assumed (as bench/trial_overhead.py): shared storage takes a checkpoint at "
                                  "500 MiB/s"),
    "resnet50_img_s": Figure(GPU_FIGURES["img_s_1024"].value,
                             "H200, the real step at 1024 per GPU, the fastest measured: a shorter epoch than any "
                             "run here has (128-256 per GPU), so the cost shares below are upper bounds"),
    "resnet18_img_s": Figure(2.3 * GPU_FIGURES["img_s_1024"].value,
                             "assumed: ResNet-50's rate x 2.3, the ratio of their multiply-adds at 32 px (CIFAR "
                             "stem: 1.30 / 0.56 GMAC), not measured"),
}


def write_seconds(config, repeats: int) -> tuple[float, float]:
    """Median seconds of ``checkpoint.capture`` + ``save`` of the config's full state here, and its MiB."""
    model = build_model(config, 100 if config.data.dataset == "cifar100" else 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32))[0].sum().backward()
    optimizer.step()  # the momentum buffers exist, as in every checkpoint after the first step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loader = types.SimpleNamespace(epoch=1)  # what a checkpoint reads of the training loader
    training = engine.Training(model, None, optimizer, scheduler, None, None, loader, None)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            started = time.perf_counter()
            checkpoint.save(folder, checkpoint.capture(training, 1, to_dict(config)), RunRecord("r", "k", "i"))
            times.append(time.perf_counter() - started)
        mib = (Path(folder) / checkpoint.STATE_FILE).stat().st_size / 2**20
    return statistics.median(times), mib


def runs() -> list[tuple[str, object, list[int]]]:
    """(name, experiment config, checkpointed epochs) of every CIFAR config and of a sweep's trial."""
    found = []
    for name in CONFIGS:
        config = load_config(REPO_ROOT / "configs" / name)
        found.append((name, config, []))
    for name in SWEEPS:
        spec = load_sweep(REPO_ROOT / "configs" / name)
        config = spec.trial_config({}, "trial")
        found.append((name, config, config.ray.checkpoint_at_epochs))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("sources:")
    for key, figure in ASSUMED.items():
        print(f"  {key} = {figure.value:g}: {figure.source}")
    print(f"  H200 write rate = {H200_WRITE_MIB_S:.0f} MiB/s: {GPU_FIGURES['checkpoint_write_s'].source}")
    upload = ASSUMED["upload_mib_s"].value
    print(f"\n{'config':34} {'GPUs':>4} {'epoch s':>7} {'MiB':>5} {'here s':>6} {'H200 s':>6} {'every':>5} "
          f"{'saves':>5} {'sync %':>6} {'async %':>7} {'MLflow lag s':>12}  upload")
    for name, config, at in runs():
        o, r = config.optim, config.ray
        here_s, mib = write_seconds(config, args.repeats)
        rate = ASSUMED[f"{config.model.encoder}_img_s"].value
        steps = int(TRAIN_IMAGES * (1 - config.data.val_fraction)) // o.global_batch_size
        epoch_s = steps * o.global_batch_size / (r.num_workers * rate)
        write_s, upload_s = mib / H200_WRITE_MIB_S, mib / upload
        saves = sum(1 for e in range(1, o.epochs + 1) if e % r.checkpoint_every == 0 or e in at or e == o.epochs)
        share = {mode: saves * stall / (o.epochs * epoch_s) for mode, stall in
                 (("sync", write_s + upload_s), ("async", write_s))}
        lag = r.checkpoint_every * epoch_s + (upload_s if r.checkpoint_upload == "async" else 0.0)
        print(f"{name:34} {r.num_workers:4d} {epoch_s:7.2f} {mib:5.0f} {here_s:6.2f} {write_s:6.2f} "
              f"{r.checkpoint_every:5d} {saves:5d} {100 * share['sync']:6.1f} {100 * share['async']:7.1f} "
              f"{lag:12.1f}  {r.checkpoint_upload} ({100 * share[r.checkpoint_upload]:.1f}% of training)")
    print("\nsync % / async %: checkpoint stalls over the step loops of all epochs, at the config's cadence; a "
          "checkpoint every epoch is `every` times that")


if __name__ == "__main__":
    main()
