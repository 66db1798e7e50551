"""A checkpoint folder: the full training state, and the run's record beside it. No Ray, no MLflow.

``state.pt`` holds the model (unwrapped), optimiser, LR schedule, epoch, the loader's epoch counter, every RNG
(torch, CUDA, numpy, python) and the resolved config, so a restarted training continues at the next epoch exactly
where it stopped; it is loaded with ``weights_only=True`` (only tensors and plain containers).

``record.json`` (``pipeline.record.RunRecord``, a few kB) is what the run produced up to that epoch, for whoever
reads the checkpoint without loading the weights: the MLflow run id and run key, every metric value of every epoch
with the timestamp it was first given (so re-sending them is idempotent: MLflow keeps one row per key, step,
timestamp and value), the PBT/PB2 exploit lineage, and plots made by the workers. The checkpoint is the source of
truth for what a run has done; MLflow is a view of it.

A state taken within an epoch (a preemption notice, ``pipeline.worker``) also holds the epoch's progress
(``engine.EpochProgress``: the step, the running sums of its metrics) and is written as format 3, which
``restore`` continues from that step; a state after an epoch is written as format 2, which a version of this
pipeline from before mid-epoch states also reads. Later fields go into ``RunRecord`` (what the run produced) or
into the state dict of ``capture`` (what training needs), with the format raised and ``restore`` told how to read
the older one.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.models import unwrap
from pipeline.record import FORMAT_VERSION, RECORD_FILE, RunRecord, load_record

if TYPE_CHECKING:
    from pipeline.engine import EpochProgress, Training

MID_EPOCH_FORMAT = 3  # a state with "progress"; FORMAT_VERSION (2): one after a completed epoch
READABLE_FORMATS = (FORMAT_VERSION, MID_EPOCH_FORMAT)

__all__ = ["FORMAT_VERSION", "MID_EPOCH_FILE", "MID_EPOCH_FORMAT", "PLOTS_FOLDER", "RECORD_FILE", "STATE_FILE",
           "RunRecord", "capture", "load", "load_record", "progress_of", "restore", "save"]
STATE_FILE = "state.pt"
MID_EPOCH_FILE = "mid_epoch.json"  # beside a mid-epoch state: {"epoch", "step"}, read without loading the state
PLOTS_FOLDER = "plots"  # PNGs the workers drew after the last epoch, logged by the run's owner


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def capture(training: Training, epoch: int, config: dict, progress: EpochProgress | None = None) -> dict:
    """The state after ``epoch`` completed epochs of ``training`` (an ``engine.Training``) with ``config``
    (the resolved config as a dict); with ``progress``, within epoch ``epoch + 1`` at its step (the loader is then
    within that epoch's pass, which a restore repeats from that step)."""
    state = {
        "format_version": FORMAT_VERSION if progress is None else MID_EPOCH_FORMAT,
        "epoch": epoch,
        "model": unwrap(training.model).state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "loader_epoch": training.train_batches.epoch - (progress is not None),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_rng_state(),
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
        },
        "config": config,
    }
    if progress is not None:
        state["progress"] = progress.state()
    return state


def progress_of(state: dict, device: torch.device) -> EpochProgress | None:
    """The epoch progress a mid-epoch state holds (None for a state after an epoch)."""
    from pipeline.engine import EpochProgress

    return EpochProgress.from_state(state["progress"], device) if "progress" in state else None


def restore(training: Training, state: dict) -> int:
    """Load ``state`` into ``training``; returns the number of completed epochs (``progress_of`` tells where a
    mid-epoch state stands within the next)."""
    if state.get("format_version") not in READABLE_FORMATS:
        raise ValueError(f"checkpoint format {state.get('format_version')} is not one of {READABLE_FORMATS}: "
                         f"start a new run (another ray.run_name)")
    unwrap(training.model).load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    training.train_batches.epoch = state["loader_epoch"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    _set_numpy_rng_state(rng["numpy"])
    random.setstate((rng["python_version"], tuple(rng["python"]), None))
    return state["epoch"]


def save(folder: str | Path, state: dict, record: RunRecord) -> Path:
    """Write ``state.pt`` and ``record.json`` into ``folder`` (and ``MID_EPOCH_FILE`` for a mid-epoch state);
    returns the state file."""
    path = Path(folder) / STATE_FILE
    torch.save(state, path)
    (Path(folder) / RECORD_FILE).write_text(record.to_json())
    if "progress" in state:
        progress = {"epoch": state["progress"]["epoch"], "step": state["progress"]["step"]}
        (Path(folder) / MID_EPOCH_FILE).write_text(json.dumps(progress))
    return path


def load(folder: str | Path) -> dict:
    """The training state in a checkpoint folder."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a varcon checkpoint folder")
    return torch.load(path, map_location="cpu", weights_only=True)
