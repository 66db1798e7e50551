"""`varcon eval`: the final evaluation (kNN, linear probe, few-shot, dispersion) of a saved checkpoint."""
from __future__ import annotations

import torch

from pipeline import checkpoint, storage
from pipeline.config import ConfigError, build_config
from pipeline.data.augment import ColorAugment
from pipeline.data.prepare import dataset_splits
from pipeline.engine import autocast_dtype
from pipeline.evaluator import Evaluator
from pipeline.models import build_model
from pipeline.train_job import prepare


def evaluate_checkpoint(path: str, overrides: list[str] | tuple[str, ...] = (), log=print) -> dict[str, float]:
    """Rebuild the model of the checkpoint in ``path`` (a folder holding state.pt, or the file; local, shared or
    a bucket URI) with the config stored in it (``overrides`` may change evaluation settings) and run
    ``Evaluator.final`` on CPU or GPU (one process)."""
    place = storage.location(path)
    if place.is_file():
        place = place.on_same(place.path.rsplit("/", 1)[0])
    if not (place / checkpoint.STATE_FILE).is_file():
        raise ConfigError(f"{path} holds no {checkpoint.STATE_FILE}: pass a checkpoint folder printed by "
                          f"`varcon train`")
    with place.as_local_folder() as folder:
        state = checkpoint.load(folder)
    config = build_config(state["config"], overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = prepare(config, log)
    model = build_model(config, files.num_classes)
    model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last)
    preprocess = ColorAugment(files.channel_mean, files.channel_std).to(device)
    evaluator = Evaluator(config, files, dataset_splits(config.data, files),
                          autocast_dtype(config.optim.precision, device))
    return {"epoch": state["epoch"], **evaluator.final(model, preprocess, device)[0]}
