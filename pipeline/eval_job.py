"""`varcon eval`: the final evaluation (kNN, linear probe, few-shot, dispersion) of a saved checkpoint."""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline import checkpoint, storage
from pipeline.config import ConfigError, first_line, stored_config
from pipeline.data.augment import ColorAugment
from pipeline.data.preflight import prepare
from pipeline.data.prepare import dataset_splits
from pipeline.engine import autocast_dtype
from pipeline.evaluator import Evaluator
from pipeline.models import build_model
from pipeline.tracking import registered_checkpoint, resolve_tracking_uri


def evaluate_checkpoint(path: str, overrides: list[str] | tuple[str, ...] = (), log: Callable[[str], None] = print
                        ) -> dict[str, float]:
    """Rebuild the model of the checkpoint in ``path`` (a folder holding state.pt, or the file; local, shared,
    a bucket URI, or a registered model ``models:/NAME/VERSION``, whose run's final checkpoint is used) with the
    config stored in it (``overrides`` may change evaluation settings) and run ``Evaluator.final`` on CPU or
    GPU (one process). A mid-epoch checkpoint (a preemption notice) is evaluated as it stands, with
    ``steps_into_next_epoch`` beside its ``epoch``."""
    with _checkpoint_folder(path, overrides) as folder:
        state = _load_state(folder, path)
    config = stored_config(state["config"], overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = prepare(config, log)
    model = build_model(config, files.num_classes)
    model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last)
    preprocess = ColorAugment(files.channel_mean, files.channel_std).to(device)
    evaluator = Evaluator(config, files, dataset_splits(config.data, files),
                          autocast_dtype(config.optim.precision, device))
    within = {"steps_into_next_epoch": state["progress"]["step"]} if "progress" in state else {}  # mid-epoch
    return {"epoch": state["epoch"], **within, **evaluator.final(model, preprocess, device)[0]}


@contextmanager
def _checkpoint_folder(path: str, overrides: list[str] | tuple[str, ...]) -> Iterator[Path]:
    """A local folder holding the checkpoint's state.pt."""
    if path.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="varcon-model-") as folder:
            yield registered_checkpoint(path, _tracking_uri(overrides), Path(folder))
        return
    place = storage.location(path)
    try:
        if place.is_file():
            place = place.on_same(place.path.rsplit("/", 1)[0])
        found = (place / checkpoint.STATE_FILE).is_file()
    except (OSError, ValueError) as exc:  # pyarrow: the service's OSError, ArrowInvalid for a path it refuses
        raise ConfigError(f"{path} cannot be read ({first_line(exc)}): check the URI, and this machine's credentials "
                          f"for it (README: Storage)") from None
    if not found:
        raise ConfigError(f"{path} holds no {checkpoint.STATE_FILE}: pass a checkpoint folder printed by "
                          f"`varcon train`, or a registered model models:/NAME/VERSION")
    with place.as_local_folder() as folder:
        yield folder


def _tracking_uri(overrides: list[str] | tuple[str, ...]) -> str:
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("tracking.tracking_uri=")]
    return resolve_tracking_uri(given[-1] if given else "")


def _load_state(folder: Path, named: str) -> dict:
    """The training state in ``folder``; a damaged file, or one that is no varcon checkpoint, is a
    ``ConfigError`` that names what was given."""
    try:
        state = checkpoint.load(folder)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged or foreign file
        raise ConfigError(f"{named}: {checkpoint.STATE_FILE} cannot be read ({first_line(exc)}): it is damaged or "
                          f"not a varcon checkpoint; pass a checkpoint folder printed by `varcon train`") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ConfigError(f"{named}: {checkpoint.STATE_FILE} is not a varcon checkpoint (no config and model in it):"
                          f" pass a checkpoint folder printed by `varcon train`")
    return state
