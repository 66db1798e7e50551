"""Full training state: save to and restore from a folder. No Ray, no MLflow.

The state holds the model (unwrapped), optimiser, LR schedule, epoch, the loader's epoch counter, every RNG
(torch, CUDA, numpy, python) and the tracking run id, so a restarted training continues at the next epoch
exactly where it stopped. It is loaded with ``weights_only=True``: only tensors and plain containers.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def capture(training, epoch: int, tracking_run_id: str = "") -> dict:
    """The state after ``epoch`` completed epochs of ``training`` (an ``engine.Training``)."""
    from pipeline.engine import unwrap

    return {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "model": unwrap(training.model).state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "loader_epoch": training.train_batches.epoch,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_rng_state(),
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
        },
        "tracking_run_id": tracking_run_id,
    }


def restore(training, state: dict) -> int:
    """Load ``state`` into ``training``; returns the number of completed epochs."""
    from pipeline.engine import unwrap

    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {state.get('format_version')} is not {FORMAT_VERSION}: "
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


def save(state: dict, folder: str | Path) -> Path:
    path = Path(folder) / STATE_FILE
    torch.save(state, path)
    return path


def load(folder: str | Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a varcon checkpoint folder")
    return torch.load(path, map_location="cpu", weights_only=True)
