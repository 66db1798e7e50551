"""No blocking host-to-device copy inside a training step or an evaluation loop, checked without a GPU.

On a GPU, ``tensor.to(device)`` from pageable host memory (or ``torch.tensor(data, device=...)``) makes the host
wait for the copy, and a step that waits cannot queue the next one. On a CPU the same call dispatches nothing, so
operator recording (``tests/test_sync_free.py``) cannot see it: here a ``TorchFunctionMode`` sees every Python-level
call instead, and any that moves a tensor to a device without ``non_blocking=True`` is a blocking copy, whatever
the device is now. ``pipeline.data.transfer.to_device`` is the one way through (pinned staging + non-blocking).
Moving a module's parameters (``Module.to``) at set-up is not a per-step copy and is not counted.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline import engine, evaluation, probes
from pipeline.config import load_config
from pipeline.data.augment import ColorAugment
from pipeline.data.transfer import to_device
from pipeline.losses import build_loss
from pipeline.models import build_model

CPU = torch.device("cpu")


def _target_and_non_blocking(args: tuple, kwargs: dict) -> tuple[object, bool]:
    """``Tensor.to``'s target device (None: a dtype change only) and its ``non_blocking`` flag."""
    target = kwargs.get("device")
    non_blocking = bool(kwargs.get("non_blocking", False))
    for arg in args[1:]:
        if isinstance(arg, (torch.device, str)):
            target = arg
        elif isinstance(arg, torch.Tensor):
            target = arg.device
        elif isinstance(arg, bool):  # to(device, dtype, non_blocking, copy): the first bool is non_blocking
            non_blocking = non_blocking or arg
            break
    return target, non_blocking


class BlockingCopies(TorchFunctionMode):
    """Records, while ``recording``, each call that would copy host data to a device and make the host wait."""

    def __init__(self) -> None:
        super().__init__()
        self.recording, self.found = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.recording:
            if name == "to" and not isinstance(args[0], torch.nn.Parameter):
                target, non_blocking = _target_and_non_blocking(args, kwargs)
                if target is not None and not non_blocking:
                    self.found.append(f"Tensor.to({target})")
            elif name == "cuda" and not kwargs.get("non_blocking", False):
                self.found.append("Tensor.cuda()")
            elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
                self.found.append(f"torch.{name}(..., device={kwargs['device']})")
        return func(*args, **kwargs)


class Recorded:
    """Iterates ``batches`` (as often as it is iterated) with ``copies`` recording from the second batch on."""

    def __init__(self, batches: list, copies: BlockingCopies) -> None:
        self.batches, self.copies = batches, copies

    def __iter__(self):
        for step, batch in enumerate(self.batches):
            self.copies.recording = self.copies.recording or step >= 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def two_view_batches(steps: int, n: int = 8, size: int = 32, classes: int = 10) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8),
             torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8),
             torch.randint(0, classes, (n,), generator=gen), torch.arange(n) + n * step) for step in range(steps)]


@pytest.fixture
def small():
    config = load_config(None, ["ray.num_workers=1", "optim.global_batch_size=8", "model.encoder=resnet18"])
    model = build_model(config, num_classes=10).to(memory_format=torch.channels_last)
    return config, model


def test_the_detector_sees_each_kind_of_blocking_copy():
    copies = BlockingCopies()
    with copies:
        copies.recording = True
        x = torch.zeros(3)
        x.to(CPU), x.to("cpu", torch.float64), torch.tensor([1.0], device=CPU), x.to(torch.float64)
        x.to(CPU, non_blocking=True), to_device(x, CPU), torch.nn.Linear(2, 2).to(CPU)
    assert copies.found == ["Tensor.to(cpu)", "Tensor.to(cpu)", "torch.tensor(..., device=cpu)"]


def test_training_steps_make_no_blocking_copy(small):
    config, model = small
    optimizer = engine.build_optimizer(model, config.optim)
    copies = BlockingCopies()
    with copies:
        engine.train_one_epoch(model, Recorded(two_view_batches(3), copies),
                               ColorAugment([0.5] * 3, [0.25] * 3, 0.4, 0.8, 0.2, seed=0),
                               build_loss(config.loss, 10), optimizer, engine.warmup_cosine(optimizer, 1, 6, 3), CPU)
        copies.recording = False
    assert not copies.found, f"blocking host-to-device copies in a training step: {copies.found}"


def test_feature_extraction_and_the_reference_probe_make_no_blocking_copy(small):
    _, model = small
    model.eval()
    preprocess = ColorAugment([0.5] * 3, [0.25] * 3)
    batches = two_view_batches(3)
    copies = BlockingCopies()
    with copies:
        shard = evaluation.extract_features(model.features, Recorded([(v, y, i) for v, _, y, i in batches], copies),
                                            24, preprocess, CPU)
        copies.recording = False
        probes.reference_probe(model.features, Recorded(batches, copies), preprocess, CPU, None, {"val": shard},
                                   10, epochs=2, lr=0.1)
        copies.recording = False
    assert not copies.found, f"blocking host-to-device copies in an evaluation loop: {copies.found}"


def test_the_features_probe_makes_no_blocking_copy():
    gen = torch.Generator().manual_seed(0)
    shard = evaluation.Shard.whole(torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen))
    copies = BlockingCopies()
    with copies:
        copies.recording = True
        probes.linear_probe(shard, {"val": shard}, 4, epochs=2, batch_size=16)
        copies.recording = False
    assert not copies.found, f"blocking host-to-device copies in the features probe: {copies.found}"
