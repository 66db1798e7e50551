"""A training step reads nothing back from the device: every operator the engine dispatches during whole steps
(after the first) is recorded on the CPU, and none may be one that makes a GPU wait for the host to see a value
(``.item()``, ``bool(tensor)``, data-dependent shapes)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import engine
from pipeline.config import load_config
from pipeline.data.augment import ColorAugment
from pipeline.losses import build_loss
from pipeline.models import build_model

# operators that copy a value to the host, or whose output shape depends on the data (so the host must wait)
SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_numpy",
           "aten::masked_select", "aten::unique_dim", "aten::_unique", "aten::_unique2", "aten::unique_consecutive",
           "aten::bincount", "aten::histc", "aten::equal", "aten::repeat_interleave", "aten::_assert_scalar",
           "aten::argwhere"}


class DispatchedOps(TorchDispatchMode):
    """Records the name of every operator dispatched while ``recording``."""

    def __init__(self) -> None:
        super().__init__()
        self.recording, self.names = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording:
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_training_steps_dispatch_no_host_synchronisation():
    config = load_config(None, ["ray.num_workers=1", "optim.global_batch_size=32"])
    model = build_model(config, num_classes=10).to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, config.optim)
    scheduler = engine.warmup_cosine(optimizer, 2, 8, 4)
    augment = ColorAugment([0.5] * 3, [0.25] * 3, 0.4, 0.8, 0.2, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (32, 3, 32, 32), generator=gen, dtype=torch.uint8),
                torch.randint(0, 256, (32, 3, 32, 32), generator=gen, dtype=torch.uint8),
                torch.randint(0, 10, (32,), generator=gen), torch.arange(32) + 32 * step) for step in range(4)]
    ops = DispatchedOps()

    def steps():  # records from the second step's start to the last step's end (the epoch summary reads after)
        for step, batch in enumerate(batches):
            ops.recording = step >= 1
            yield batch
        ops.recording = False

    with ops:
        metrics = engine.train_one_epoch(model, steps(), augment, build_loss(config.loss, 10), optimizer, scheduler,
                                         torch.device("cpu"), epoch=1)
    assert len(ops.names) > 500 and "aten::convolution_backward" in ops.names  # whole steps were recorded
    syncing = sorted(set(ops.names) & SYNCING)
    assert not syncing, f"operators that synchronise with the host inside a step: {syncing}"
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
