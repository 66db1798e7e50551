"""A sweep trial's non-training time over its training time: a short real trial here, before and after, side by
side in one run; and a model of a CIFAR-100 ASHA trial on a GPU cluster from stated step times.

    python bench/trial_overhead.py [--repeats 3] [--epochs 3]     # ~10 min on 2 cores: both parts
    python bench/trial_overhead.py --model-only                   # the cluster model alone, from recorded figures
    python bench/trial_overhead.py --gpu-probe [--steps 20]       # on a GPU machine (torch, no Ray/FFCV/MLflow):
                                                                  # the device figures of GPU_FIGURES
"before" is today's default, "after" the changes, selected by the processes' environment (``VARIANTS``): after,
Ray Train workers reuse FFCV's compiled code (``pipeline.data.ffcv_loader.reuse_for_dataset``) instead of every
loader compiling its own pipeline; ``VARCON_COMPILE_CACHE=off`` is before.

Here, first the compile alone: a worker's four loaders (training, bank, validation, test) built in a new process
and their first batches timed, before and after alternating (numba's on-disk cache filled once first: its cold
time is printed). Then real one-trial sweeps: ``run_sweep`` over configs/tune/digits_asha.yaml (Tune starts the
trial, the trial opens its MLflow run and trains under a ``TorchTrainer`` with 1 worker, the driver summarises),
each in its own process with its own local Ray instance, all in one VARCON_HOME (the data prepared once), before
and after alternating. The trial's time, from its function's start and end and its final checkpoint's record
(each epoch's ``epoch_time_s``, ``eval_time_s`` and timestamp):
  train   the epochs' step loops, the first one counted at the median of the others
  start   trial start -> set-up done (process starts, MLflow run, Ray Train's worker group, model, loaders), plus
          the first epoch's excess over the median (the training pipeline's compile)
  ep-0    the epoch-0 evaluation (the untrained encoder's monitor: compiles the evaluation pipeline)
  rungs   the evaluations at the scheduler's rungs
  ckpts   checkpoints and reports between epochs
  final   after the last step loop: final evaluation, plots, last checkpoint, Ray Train's shutdown, finish_run
non-training = wall - train. The sweep driver's summary after the trial (on the head node) is printed, not
counted.

Cluster model (``cluster_trial``): one trial of configs/tune/cifar100_resnet50_asha.yaml (CIFAR-100, ResNet-50,
4 GPUs, 45k training and 5k validation images, global batch 1024, rungs 10/30/90, 100 epochs) added up phase by
phase from ``GPU_FIGURES`` (measured on the lent H200) and ``ASSUMPTIONS``, each with its source, and the compile
times measured here. Before: a checkpoint every epoch (``ray.checkpoint_every`` 1) and FFCV's own compiles;
after: every 10 epochs (the sweep file) and compiled code reused. Printed for a trial stopped at each rung, a
completed one and the whole sweep (24 trials; synchronous successive halving counts: 1/3 go on at each rung).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "configs" / "tune" / "digits_asha.yaml"
VARIANTS = {  # the environment of a run's processes (Ray's workers inherit the driver's)
    "before": {"VARCON_COMPILE_CACHE": "off"},  # FFCV's own compiles: every loader, every process
    "after": {},  # compiled code reused: within a process, and numba's cache in numba/ beside the prepared data
}
TIMES_DIR = ""  # set in the trial process (a module global: Tune ships ``timed_trial`` by value with it)


# ---------------------------------------------------------------------------------------------------- here ---

def timed_trial(sampled, spec, parent_run_id, prepared):
    """``tune.trainables.train_trial`` with its start and end written to ``TIMES_DIR``."""
    import json as _json
    import os as _os
    import time as _time

    from tune.trainables import train_trial

    start = _time.time()
    train_trial(sampled, spec, parent_run_id, prepared)
    with open(_os.path.join(TIMES_DIR, f"{spec.settings.name}.json"), "w") as handle:
        _json.dump({"start": start, "end": _time.time()}, handle)


def run_one(variant: str, name: str, epochs: int) -> dict:
    """One one-trial sweep in this process (started by ``measure`` with the variant's environment): its phases."""
    global TIMES_DIR
    import ray

    import tune.sweep
    from pipeline.train_job import checkpoints_in
    from tune.spec import load_sweep

    home = Path(os.environ["VARCON_HOME"])
    TIMES_DIR = str(home / "times")
    os.makedirs(TIMES_DIR, exist_ok=True)
    tune.sweep.train_trial = timed_trial
    spec = load_sweep(SWEEP, [f"tune.name={name}", "tune.num_samples=1", "tune.registered_model_name=",
                              f"optim.epochs={epochs}"])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=True)
    began = time.time()
    outcome = tune.sweep.run_sweep(spec, log=lambda *_: None)
    ended = time.time()
    ray.shutdown()
    trial = json.loads((Path(TIMES_DIR) / f"{name}.json").read_text())
    (folder,) = [f for f in (home / ".cache" / "ray_results").iterdir() if f.name.startswith(f"{name}-")]
    record = checkpoints_in(folder)[-1].record
    assert outcome.rows[0].status.completed and record.epoch == epochs, outcome.rows
    return phases(record, trial["start"], trial["end"], epochs) | {"summary": ended - trial["end"],
                                                                    "sweep": ended - began}


def phases(record, start: float, end: float, epochs: int) -> dict:
    """The trial's time split as the module docstring says, from its final record. Epoch k's steps begin at its
    timestamp less its evaluation and step times (the last epoch also draws the plots, so the gap before it is
    taken as the median of the others)."""
    history = record.history()
    epoch_s, eval_s = dict(history["epoch_time_s"]), dict(history["eval_time_s"])
    stamp = {step: ms / 1000 for step, _, _, ms in record.entries}
    steady = statistics.median(epoch_s[e] for e in range(2, epochs + 1)) if epochs > 1 else epoch_s[1]
    excess = epoch_s[1] - steady  # the first pass: the training pipeline's compile, first batches, autotuning
    begins = {e: stamp[e] - eval_s[e] - epoch_s[e] for e in range(1, epochs)}
    gaps = [begins[e + 1] - stamp[e] for e in range(1, epochs - 1)]  # a checkpoint and a report between epochs
    last_gap = statistics.median(gaps) if gaps else 0.0
    initial = eval_s.get(0, 0.0)
    set_up_done = stamp[0] - initial if 0 in stamp else begins[1]
    reports = sum(gaps) + (begins[1] - stamp[0] if 0 in stamp else 0.0) + last_gap
    last_begins = stamp[epochs - 1] + last_gap if epochs > 1 else begins[1]
    return {"wall": end - start, "training": sum(epoch_s.values()) - excess, "startup": set_up_done - start + excess,
            "initial": initial, "monitor": sum(eval_s.get(e, 0.0) for e in range(1, epochs)), "reports": reports,
            "final": end - last_begins - epoch_s[epochs], "fraction": record.at(0).get("initial_eval_fraction", 0.0)}


def compile_one(variant: str) -> dict:
    """The four loaders a trial's worker builds (training, bank, validation, test; 2 threads: FFCV compiles its
    thread-parallel variant, as with the cluster's 8), each one's first batch timed, in this new process."""
    from pipeline.config import load_config
    from pipeline.data import prepare_dataset
    from pipeline.data.ffcv_loader import reuse_for_dataset
    from pipeline.data.loaders import eval_loaders, train_loader
    from pipeline.data.prepare import dataset_splits

    config = load_config(None, ["ray.num_workers=1", "data.loader_threads=2"])
    files = prepare_dataset(config.data, Path(os.environ["VARCON_HOME"]) / ".cache" / "data", log=lambda *_: None)
    split = dataset_splits(config.data, files)
    if variant == "after":
        reuse_for_dataset(files.train)
    began = time.perf_counter()
    loaders = [train_loader(config, files, 128, False, split),
               *eval_loaders(config, files, 512, False, {"bank": split.bank, "val": split.val, "test": None}).values()]
    for loader in loaders:
        next(iter(loader))
    return {"compile": time.perf_counter() - began}


def measure(repeats: int, epochs: int) -> dict[str, float]:
    """The interleaved runs, each a new process; then the medians and the ratio. Returns the compile medians."""
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="varcon-trial-overhead-") as home:
        env = {**os.environ, "VARCON_HOME": home, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}

        def child(*args: str, variant: str) -> dict:
            done = subprocess.run([sys.executable, __file__, *args], env={**env, **VARIANTS[variant]},
                                  capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        cold = child("--compile", "after", variant="after")["compile"]
        compiled: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for repeat in range(repeats):
            for variant in list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS)):
                compiled[variant].append(child("--compile", variant, variant=variant)["compile"])
        compile_s = {name: statistics.median(found) for name, found in compiled.items()}
        print(f"FFCV compiles of a worker's four loaders (first batches, new processes, {repeats} interleaved "
              f"repeats): before {compile_s['before']:.1f} s ({min(compiled['before']):.1f}-"
              f"{max(compiled['before']):.1f}), after {compile_s['after']:.1f} s ({min(compiled['after']):.1f}-"
              f"{max(compiled['after']):.1f}; {cold:.1f} s while it fills numba's cache): "
              f"{compile_s['after'] / compile_s['before']:.2f}")
        print(f"one-trial digits sweeps ({SWEEP.name}, {epochs} epochs, 1 worker x 1 CPU), {repeats} interleaved "
              f"repeats; seconds")
        print(f"{'run':>10} {'wall':>6} {'train':>6} {'start':>6} {'ep-0':>5} {'rungs':>5} {'final':>6} "
              f"{'ckpts':>5} {'non-train/train':>15} {'summary':>7}")
        for repeat in range(repeats):
            order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                row = child("--trial", variant, "--name", f"to-{variant}-{repeat}", "--epochs", str(epochs),
                            variant=variant)
                rows[variant].append(row)
                print(f"{variant + '-' + str(repeat + 1):>10} {row['wall']:6.1f} {row['training']:6.1f} "
                      f"{row['startup']:6.1f} {row['initial']:5.1f} {row['monitor']:5.1f} {row['final']:6.1f} "
                      f"{row['reports']:5.1f} {(row['wall'] - row['training']) / row['training']:15.2f} "
                      f"{row['summary']:7.1f}", flush=True)
    # the variants train the same steps: their training times differ by this machine's noise only, so each
    # variant's non-training time is set against the median training time of all runs
    training = statistics.median(r["training"] for found in rows.values() for r in found)
    other = {}
    for variant, found in rows.items():
        seconds = [r["wall"] - r["training"] for r in found]
        other[variant] = statistics.median(seconds)
        m = {key: statistics.median(r[key] for r in found) for key in found[0]}
        print(f"{variant}: non-training {other[variant]:.1f} s (median; {min(seconds):.1f}-{max(seconds):.1f}): "
              f"start-up {m['startup']:.1f}, epoch-0 {m['initial']:.1f} (fraction {m['fraction']:g}), rungs "
              f"{m['monitor']:.1f}, final {m['final']:.1f}; / training {training:.1f} s (all runs' median) = "
              f"{other[variant] / training:.2f}")
    print(f"after / before non-training time: {other['after'] / other['before']:.2f}")
    return compile_s


# ------------------------------------------------------------------------------------------- cluster model ---

@dataclass(frozen=True)
class Figure:
    value: float
    source: str


H200 = "the lent H200 (torch 2.11.0+cu130), `bench/trial_overhead.py --gpu-probe` on 2026-12-04"
# per GPU of a 4-GPU trial; a "fresh process" is a new Python process on a node that ran one before
GPU_FIGURES = {
    "img_s_1024": Figure(7608, "bench/results/2026-12-04-h200-gpu_throughput-bc46e1e.md: the real training step "
                               "(staged copy, colour augmentation, bf16 ResNet-50, VarCon, SGD) at batch 1024"),
    "img_s_256": Figure(5544, f"{H200} and 4 more fresh processes: the same step at 256 images per GPU (1,024 / 4 "
                              f"GPUs, what each GPU of a trial runs): 5210, 5457, 5544, 6114, 7012 img/s, median"),
    "torch_import_s": Figure(3.3, f"{H200}: a fresh process's `import torch`"),
    "imports_s": Figure(7.9, f"{H200}: a fresh process's `import torch` 3.3 s + `import pipeline.engine` 4.6 s "
                             f"(the first process on the machine: 10.4 s)"),
    "cuda_init_s": Figure(0.17, f"{H200}: the first CUDA tensor in a fresh process"),
    "model_build_s": Figure(0.53, f"{H200}: ResNet-50 (CIFAR stem) + head built and moved to the GPU"),
    "first_step_s": Figure(9.4, f"{H200}: the first training step at 256 in fresh processes, 8.4, 9.5, 10.3 s "
                                f"(median, less a steady step): CUDA/cuBLAS start and cuDNN autotuning (the "
                                f"engine's cudnn.benchmark) of the step's convolutions; 39.7 s in the machine's "
                                f"first process (kernel caches cold), 4.9 s with cudnn.benchmark off (one run)"),
    "eval_img_s": Figure(52_800, f"{H200}: feature extraction at the evaluation's batch 512, bf16, eval mode: 6.9x "
                                 f"the training step's images/s at 1024 (the issue's estimate was ~3x)"),
    "new_eval_shape_s": Figure(0.81, f"{H200}: the first batch of a new shape less the second (cuDNN autotuning "
                                     f"of the forward): 0.76-0.87 s for 498, 226, 452, 101 and 125 images"),
    "eval_img_s_128": Figure(23_600, f"{H200}: feature extraction at 128 per GPU (the reference probe's batch)"),
    "checkpoint_write_s": Figure(0.19, f"{H200}: checkpoint.capture + save of the 213.7 MiB state to local disk"),
    "knn_s": Figure(0.05, f"{H200}: 5k x 45k cosine similarities and their top 200 on the GPU"),
    "plots_s": Figure(6.9, f"{H200}: the final plots on its 16 cores: PCA 2.3 s, t-SNE 4.5 s (2,000 points), "
                           f"confusion matrix 0.1 s"),
}
ASSUMPTIONS = {
    "actor_start_s": Figure(1.0, "assumed: Ray places an actor and starts its process (before its imports)"),
    "nccl_init_s": Figure(2.0, "assumed: NCCL set-up of 4 GPUs on one node"),
    "mlflow_open_s": Figure(2.0, "assumed: create the trial's run with params, config, manifests and the "
                                 "environment over HTTP (listing the installed distributions: 0.65-1.3 s here)"),
    "setup_s": Figure(0.3, "measured here: splits read, loaders and evaluator built (digits)"),
    "upload_mib_s": Figure(500.0, "assumed: shared storage (ray.storage_path) takes a checkpoint at 500 MiB/s"),
    "report_s": Figure(0.05, "measured here: a Ray Train report with a small checkpoint (the digits runs' "
                             "ckpts column over their epochs)"),
    "features_probe_s": Figure(5.0, "assumed: 100 epochs of the features probe on 45k x 2048 on the GPU"),
    "few_shot_s": Figure(1.0, "assumed: 2 x 200 nearest-class-mean episodes on the gathered test features"),
    "finish_s": Figure(7.0, "assumed: Ray Train's shutdown 2 s + finish_run 5 s (the encoder as an MLflow model, "
                            "plots, the final record)"),
    "stop_s": Figure(3.0, "assumed: Tune stops an ASHA-stopped trial and its worker group"),
}
COMPILE_RECORDED = {"before": 8.9, "after": 3.5}  # seconds; the measured part's latest figures, for --model-only
TRAIN, VAL, TEST, BATCH, GPUS, EPOCHS, RUNGS = 45_000, 5_000, 10_000, 1024, 4, 100, (10, 30, 90)
STATE_MIB = 213.7


def trial_seconds(stop_epoch: int, img_s: float, compile_s: float, checkpoint_every: int,
                  light_controller: bool = False) -> dict:
    """One CIFAR-100 ASHA trial that trains ``stop_epoch`` epochs (a rung: stopped there; ``EPOCHS``: completed)."""
    g, a = {k: v.value for k, v in GPU_FIGURES.items()}, {k: v.value for k, v in ASSUMPTIONS.items()}
    steps = (TRAIN // GPUS) // (BATCH // GPUS)  # drop_last per rank
    training = stop_epoch * steps * BATCH / (GPUS * img_s)
    process = a["actor_start_s"] + g["imports_s"]
    startup = (process + a["mlflow_open_s"]  # the Tune trial's process, then its MLflow run
               # Ray Train's controller: before, it imported pipeline.ray_train (torch and the engine) for the
               # callbacks; after, pipeline.ray_callbacks (neither), and torch only for Ray's own TorchConfig
               + (a["actor_start_s"] + g["torch_import_s"] if light_controller else process)
               + process + g["cuda_init_s"] + a["nccl_init_s"]  # the 4 workers, side by side
               + g["model_build_s"] + a["setup_s"] + compile_s + g["first_step_s"])
    monitor_pass = (TRAIN + VAL) / GPUS / g["eval_img_s"] + g["knn_s"]
    initial = monitor_pass + 2 * g["new_eval_shape_s"]  # the bank's and validation's last batches (498, 226)
    rungs = sum(monitor_pass for r in RUNGS if r < stop_epoch or (r == stop_epoch and stop_epoch < EPOCHS))
    saves = sum(1 for e in range(1, stop_epoch + 1) if e % checkpoint_every == 0 or e == EPOCHS)
    checkpoints = saves * (g["checkpoint_write_s"] + STATE_MIB / a["upload_mib_s"]) + stop_epoch * a["report_s"]
    if stop_epoch < EPOCHS:
        final = a["stop_s"]
    else:
        final = ((TRAIN + VAL + TEST) / GPUS / g["eval_img_s"] + 2 * g["knn_s"] + g["new_eval_shape_s"]
                 + a["features_probe_s"] + EPOCHS * TRAIN / GPUS / g["eval_img_s_128"] + a["few_shot_s"]
                 + g["plots_s"] + a["finish_s"])
    return {"training": training, "startup": startup, "initial": initial, "rungs": rungs,
            "checkpoints": checkpoints, "final": final}


def cluster_trial(compile_s: dict[str, float] | None = None) -> None:
    """The model's table: before (per-epoch checkpoints, FFCV's own compiles) and after (checkpoints every 10
    epochs as the sweep file sets, compiled code reused), at both step rates."""
    compile_s = compile_s or COMPILE_RECORDED
    print("\ncluster model: one trial of configs/tune/cifar100_resnet50_asha.yaml (4 GPUs, 43 steps of 1,024 "
          "images per epoch); sources:")
    for key, figure in {**GPU_FIGURES, **ASSUMPTIONS}.items():
        print(f"  {key} = {figure.value:g}: {figure.source}")
    print(f"  compile_s = {compile_s['before']:.1f} before, {compile_s['after']:.1f} after: the four loaders' "
          f"first batches measured here (2 threads, as the cluster's 8 compile the same code)")
    g = {k: v.value for k, v in GPU_FIGURES.items()}
    full = (TRAIN + VAL) / GPUS / g["eval_img_s"] + g["knn_s"]
    tenth = full - 0.9 * (TRAIN + VAL) / GPUS / g["eval_img_s"] + 2 * g["new_eval_shape_s"]
    print(f"  epoch-0 kNN per trial beyond what the first rung pays anyway: {full:.2f} s on all of bank and "
          f"validation, {tenth:.2f} s at eval.initial_fraction=0.1 (its last batches, 101 and 125 images per rank, "
          f"are two more cuDNN autotunings; rung 10 autotunes 498 and 226 anyway): the sweep keeps 1.0")
    # synchronous successive halving of 24 trials, reduction 3: stopped at 10, 30, 90, completed
    share = {10: 24 * 2 / 3, 30: 8 * 2 / 3, 90: 8 / 3 * 2 / 3, EPOCHS: 8 / 9}
    for label, img_s in (("7608 img/s per GPU (batch 1024)", GPU_FIGURES["img_s_1024"].value),
                         ("5544 img/s per GPU (batch 256)", GPU_FIGURES["img_s_256"].value)):
        print(f"\nat {label}: non-training / training (seconds of non-training time: start-up, epoch 0, rungs, "
              f"checkpoints, end)")
        totals = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
        for stop in share:
            cells = []
            for variant, every in (("before", 1), ("after", 10)):
                parts = trial_seconds(stop, img_s, compile_s[variant], every, light_controller=variant == "after")
                other = sum(v for k, v in parts.items() if k != "training")
                totals[variant][0] += share[stop] * other
                totals[variant][1] += share[stop] * parts["training"]
                cells.append(f"{variant} {other / parts['training']:5.2f} ({parts['startup']:.0f}, "
                             f"{parts['initial']:.1f}, {parts['rungs']:.1f}, {parts['checkpoints']:.1f}, "
                             f"{parts['final']:.0f} s of {parts['training']:.0f} s)")
            kind = "completed" if stop == EPOCHS else f"stopped at {stop}"
            print(f"  {kind:>13}: " + "   ".join(cells))
        print(f"  {'whole sweep':>13}: before {totals['before'][0] / totals['before'][1]:.2f}, after "
              f"{totals['after'][0] / totals['after'][1]:.2f} (24 trials: {share[10]:.0f} stopped at 10, "
              f"{share[30]:.1f} at 30, {share[90]:.1f} at 90, {share[EPOCHS]:.1f} completed)")
        fixed = trial_seconds(10, img_s, compile_s["after"], 10, light_controller=True)
        per_epoch = fixed["training"] / 10
        needed = (fixed["startup"] + fixed["initial"] + fixed["final"]) / 0.1
        print(f"  10% needs a trial's fixed {needed / 10:.0f} s (start-up, epoch 0, stop) over >= {needed:.0f} s of "
              f"training: {needed / per_epoch:.0f} epochs at {per_epoch:.2f} s")
        population_restart(img_s, compile_s["after"])


def population_restart(img_s: float, compile_s: float) -> None:
    """A PBT/PB2 trial pauses at every perturbation (``synch``): its worker group stops, and it starts again as a
    new Ray Train run (``tune.train_reports``) that loads its start checkpoint. The cost of one restart against the
    training between two perturbations, for the CIFAR-100 trial of the model (4 GPUs) and an ImageNet-1K population
    of 4 trials x 8 GPUs on the 32-GPU cluster (its start-up taken as the CIFAR trial's: an assumption)."""
    a = {k: v.value for k, v in ASSUMPTIONS.items()}
    parts = trial_seconds(10, img_s, compile_s, 10, light_controller=True)
    restart = a["stop_s"] + parts["startup"] + STATE_MIB / a["upload_mib_s"]  # stop, start, read the checkpoint
    imagenet_epoch = 1_281_167 / (8 * 2445)  # 8 GPUs at the H200's model-only ImageNet step (staging.py's figure)
    print(f"  a population trial's restart at each perturbation: {restart:.0f} s (stop {a['stop_s']:.0f} s, "
          f"start-up {parts['startup']:.0f} s, the start checkpoint read {STATE_MIB / a['upload_mib_s']:.1f} s)")
    for label, epoch in (("CIFAR-100, 4 GPUs", parts["training"] / 10), ("ImageNet-1K, 8 GPUs", imagenet_epoch)):
        shares = ", ".join(f"{interval}: {restart / (interval * epoch):.0%}" for interval in (2, 5, 10, 20, 50))
        print(f"    {label} ({epoch:.2f} s an epoch): restart / training by perturbation_interval {shares}; "
              f"<= 10% from {math.ceil(restart / (0.1 * epoch))} epochs")


# ----------------------------------------------------------------------------------------------- GPU probe ---

FRESH_PROCESS = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
torch.ones(1, device="cuda").sum().item()
t2 = time.perf_counter()
import pipeline.engine
t3 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "cuda_init_s": t2 - t1, "import_engine_s": t3 - t2}))
"""


def gpu_probe(steps: int, smoke: bool) -> None:
    """On one GPU, the CIFAR-100 recipe's pieces as a 4-GPU trial runs them per GPU: a fresh process's imports
    and CUDA start, the model build, the first training step (cuDNN autotuning, ``cudnn.benchmark`` as the
    engine sets it) and the steady one at 256 images (1,024 / 4 GPUs) and 1,024, feature extraction at the
    evaluation's batch (512) and at the odd last-batch shapes of each shard, a checkpoint write, a kNN search
    and the final plots. ``smoke``: tiny sizes on the CPU (checks the code, not the figures)."""
    import shutil

    import numpy as np
    import torch

    from pipeline import checkpoint, engine, plots
    from pipeline.config import load_config, to_dict
    from pipeline.data.augment import ColorAugment
    from pipeline.losses import build_loss
    from pipeline.models import build_model
    from pipeline.record import RunRecord

    device = torch.device("cpu" if smoke else "cuda")
    figures: dict = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__}
    if not smoke:
        for attempt in ("first", "second"):
            done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
            figures[f"fresh_process_{attempt}"] = json.loads(done.stdout.strip().splitlines()[-1])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as engine.build_training sets it on a GPU
    small, batch_small, batch_large, eval_batch = (4, 4, 8, 8) if smoke else (32, 256, 1024, 512)
    config = load_config(REPO / "configs" / "cifar100_resnet50.yaml",
                         ["ray.num_workers=1", f"optim.global_batch_size={batch_small}"]
                         + (["model.encoder=resnet18", "model.head_hidden_dim=64"] if smoke else []))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(run) -> float:
        sync()
        began = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - began

    holder = {}
    figures["model_build_s"] = timed(lambda: holder.update(model=build_model(config, 100).to(
        device, memory_format=torch.channels_last)))
    model = holder["model"]
    optimizer = engine.build_optimizer(model, config.optim)
    scheduler = engine.warmup_cosine(optimizer, 0, 100_000, 1_000)
    d = config.data
    mean, std = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    augment = ColorAugment(mean, std, d.color_jitter_strength, d.color_jitter_prob, d.grayscale_prob, 0).to(device)
    preprocess = ColorAugment(mean, std).to(device)
    loss_fn = build_loss(config.loss, 100)
    amp = engine.autocast_dtype(config.optim.precision, device)
    gen = torch.Generator().manual_seed(0)

    def batches(count: int, batch: int) -> list:
        def view():
            return torch.randint(0, 256, (batch, small, small, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)
        made = [(view(), view(), torch.randint(0, 100, (batch,), generator=gen), torch.arange(batch) + k * batch)
                for k in range(2)]
        return [made[k % 2] for k in range(count)]

    def epoch(run_batches) -> None:
        engine.train_one_epoch(model, run_batches, augment, loss_fn, optimizer, scheduler, device, amp)

    for batch in (batch_small, batch_large):
        first = timed(lambda size=batch: epoch(batches(1, size)))
        steady = timed(lambda size=batch: epoch(batches(steps, size))) / steps
        figures[f"train_first_step_s_{batch}"], figures[f"train_step_s_{batch}"] = first, steady
        figures[f"train_img_s_{batch}"] = batch / steady

    model.eval()
    features = model.features

    def extract(images) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            features(preprocess(images.to(device)).contiguous(memory_format=torch.channels_last))

    def image_batch(n: int):
        return torch.randint(0, 256, (n, small, small, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)

    full = image_batch(eval_batch)
    figures["eval_first_batch_s"] = timed(lambda: extract(full))
    per_batch = timed(lambda: [extract(full) for _ in range(steps)]) / steps
    figures["eval_img_s"] = eval_batch / per_batch
    # the last batch of each rank's shard (4 ranks, batch 512): bank 45,000 -> 498, val 5,000 -> 226, test 10,000
    # -> 452; at eval.initial_fraction=0.1: bank 4,500 -> 101, val 500 -> 125
    odd = {}
    for n in ((3, 5, 7) if smoke else (498, 226, 452, 101, 125)):
        images = image_batch(n)
        first = timed(lambda shaped=images: extract(shaped))
        again = timed(lambda shaped=images: extract(shaped))
        odd[n] = first - again
    figures["eval_new_shape_s"] = odd
    reference = image_batch(4 if smoke else 128)
    timed(lambda: extract(reference))
    figures["eval_img_s_128"] = len(reference) / (timed(lambda: [extract(reference) for _ in range(steps)]) / steps)
    model.train()

    loader = types.SimpleNamespace(epoch=1)  # what a checkpoint reads of the training loader
    training = engine.Training(model, loss_fn, optimizer, scheduler, augment, preprocess, loader, amp)
    with tempfile.TemporaryDirectory() as folder:
        record = RunRecord("run", "key", "identity")
        figures["checkpoint_write_s"] = timed(lambda: checkpoint.save(folder, checkpoint.capture(
            training, 1, to_dict(config)), record))
        figures["checkpoint_mib"] = (Path(folder) / checkpoint.STATE_FILE).stat().st_size / 2**20
        copy = Path(folder) / "copy"
        figures["checkpoint_local_copy_s"] = timed(lambda: shutil.copytree(folder, copy, ignore=lambda *_: ["copy"]))

    bank = torch.nn.functional.normalize(torch.randn(45_000 // (100 if smoke else 1), 2048, device=device), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(5_000 // (100 if smoke else 1), 2048, device=device), dim=1)
    figures["knn_5k_x_45k_s"] = timed(lambda: (queries @ bank.T).topk(min(200, len(bank)), dim=1))

    rng = np.random.default_rng(0)
    test_features = rng.normal(size=(10_000 // (50 if smoke else 1), 2048)).astype(np.float32)
    labels = rng.integers(0, 100, len(test_features))
    with tempfile.TemporaryDirectory() as folder:
        for method in ("pca", "tsne"):
            began = time.perf_counter()
            plots.embedding_plot(test_features, labels, method, Path(folder) / f"{method}.png")
            figures[f"plot_{method}_s"] = time.perf_counter() - began
        began = time.perf_counter()
        plots.confusion_matrix_plot(labels, labels, 100, Path(folder) / "confusion.png", "confusion")
        figures["plot_confusion_s"] = time.perf_counter() - began
    print(json.dumps(figures))


# ---------------------------------------------------------------------------------------------------- main ---

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--gpu-probe", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="with --gpu-probe: tiny sizes on the CPU")
    parser.add_argument("--steps", type=int, default=20, help="with --gpu-probe: steady steps timed")
    parser.add_argument("--trial", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--compile", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu_probe:
        gpu_probe(args.steps, args.smoke)
        return
    if args.trial:
        print(json.dumps(run_one(args.trial, args.name, args.epochs)))
        return
    if args.compile:
        print(json.dumps(compile_one(args.compile)))
        return
    cluster_trial(None if args.model_only else measure(args.repeats, args.epochs))


if __name__ == "__main__":
    sys.exit(main())
