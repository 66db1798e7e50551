"""The training engine in plain PyTorch: one step, one epoch, the epoch loop with evaluation. No Ray, no MLflow.

Runs alone in one process (tests, the GPU benchmark) or once per worker under DDP; the caller provides
``wrap_model`` (e.g. DDP preparation) and ``on_epoch_end`` (reporting, tracking).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline import checkpoint, distributed
from pipeline.data.augment import ColorAugment
from pipeline.data.loaders import train_loader
from pipeline.data.prepare import PreparedDataset, dataset_splits
from pipeline.data.splits import SplitIndices
from pipeline.data.staging import staged
from pipeline.data.transfer import to_device
from pipeline.evaluator import Evaluator, FinalFeatures
from pipeline.losses import build_loss
from pipeline.models import build_model
from pipeline.schedules import temperatures_at

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig, OptimConfig


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum, or timm's LARS. Biases and norm weights (1-d parameters) get no weight decay (and no
    LARS adaptation) unless ``optim.decay_norm_and_bias``, as the reference recipes do."""
    decay = [p for p in model.parameters() if p.ndim > 1 or optim.decay_norm_and_bias]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not optim.decay_norm_and_bias]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim.optimizer == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=optim.lr, momentum=optim.momentum)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (``auto``) or when asked; ``None`` means float32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, steps_per_epoch: int = 1,
                  warmup_start_lr: float = 0.0, min_lr_ratio: float = 0.0, cosine_per: str = "step"
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate at step s (0-based) as a factor of the base lr, a per-step ``LambdaLR``.

    Cosine with floor m = ``min_lr_ratio``: ``m + (1 - m) * 0.5 * (1 + cos(pi * t))``, where t is the progress
    after warm-up per step (``cosine_per="step"``, ours), or ``epoch / epochs`` with epochs counted from 1
    (``"epoch"``: the references, SupContrast's ``adjust_learning_rate``). Warm-up, for s < ``warmup_steps``:
    ``(s + 1) / warmup_steps`` (ours), or with ``warmup_start_lr`` (absolute, given as its factor of the base lr)
    linear from it to the cosine's value at the end of warm-up, ``p = s / warmup_steps`` (the references'
    per-iteration ``warmup_learning_rate``).
    """
    base_lr = optimizer.param_groups[0]["lr"]
    epochs = max(1, total_steps // max(1, steps_per_epoch))

    def cosine(progress: float) -> float:
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def after_warmup(step: int) -> float:
        if cosine_per == "epoch":
            return cosine(min(step // steps_per_epoch + 1, epochs) / epochs)
        return cosine(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    warmup_end = cosine(warmup_steps / steps_per_epoch / epochs) if cosine_per == "epoch" else cosine(0.0)

    def factor(step: int) -> float:
        if step >= warmup_steps:
            return after_warmup(step)
        if warmup_start_lr <= 0:
            return (step + 1) / warmup_steps
        start = warmup_start_lr / base_lr
        return start + step / warmup_steps * (warmup_end - start)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochProgress:
    """Where a worker stands within epoch ``epoch``: ``step`` batches trained, the running sums of the step metrics
    (``totals``: 0-d tensors on the device), the global ``images`` trained and the seconds spent (``elapsed_s``).
    A mid-epoch checkpoint holds it (``state``), so that a resumed epoch ends with an uninterrupted one's
    metrics."""

    epoch: int
    step: int = 0
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    images: float = 0.0
    elapsed_s: float = 0.0

    def state(self) -> dict:
        """Plain values and CPU tensors (what ``torch.load(weights_only=True)`` reads back)."""
        return {"epoch": self.epoch, "step": self.step, "images": float(self.images),
                "elapsed_s": float(self.elapsed_s),
                "totals": {key: torch.as_tensor(value).detach().cpu() for key, value in self.totals.items()}}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochProgress:
        return cls(state["epoch"], state["step"], {key: value.to(device) for key, value in state["totals"].items()},
                   state["images"], state["elapsed_s"])


def gradient_norm(model: nn.Module) -> torch.Tensor:
    """||g||_2 over every parameter's gradient (one device), a 0-d tensor left on it: the per-tensor norms in one
    multi-tensor kernel, as ``clip_grad_norm_`` takes them (``get_total_norm`` would also move each norm to the
    first gradient's device, a ``.to`` per step that tests/test_host_copies.py cannot tell from a host copy)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train_one_epoch(model: nn.Module, batches: Iterable, augment: nn.Module, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    device: torch.device, amp_dtype: torch.dtype | None = None, epoch: int = 1,
                    resumed: EpochProgress | None = None, mid_epoch: Callable[[EpochProgress], None] | None = None,
                    mid_epoch_every: int = 0) -> dict[str, float]:
    """One pass over ``batches`` of ``(view1, view2, labels, index)``; returns epoch means of the loss and its
    stats.

    Each step: x = [aug(view1); aug(view2)] ``[2n, 3, S, S]`` (drawn by epoch and global sample index),
    z = model(x), the loss over the views of all workers (gathered), backward of ``world_size * loss`` (see
    ``pipeline.distributed``). The model runs under ``amp_dtype`` autocast when given; the loss is float32
    regardless. ``train_grad_norm`` is the mean over steps of ||g||_2, g the gradient of the global loss (after
    DDP's all-reduce: the same on every rank, whatever the worker count), before the optimiser's step (tau1
    rescales it: a temperature schedule is partly a learning-rate schedule). Nothing in a step reads the device
    back (``tests/test_sync_free.py``): metrics stay there until the epoch ends. ``resumed``: the progress of
    this epoch before an interruption (``batches`` then starts at its step); ``mid_epoch(progress)`` runs after
    every ``mid_epoch_every``-th step of the training (counted over the epochs, so epochs shorter than that are
    asked within too) but an epoch's last.
    """
    model.train()
    scale = distributed.loss_scale_for_global_batch()
    progress = resumed if resumed is not None else EpochProgress(epoch)
    hooked = mid_epoch is not None and mid_epoch_every > 0
    last_step = len(batches) if hooked else 0
    before = (epoch - 1) * last_step  # steps of the epochs before (every epoch has len(batches) steps)
    start = time.perf_counter() - progress.elapsed_s
    for view1, view2, labels, index in batches:
        labels = to_device(labels, device)
        x = torch.cat([augment(view1, epoch, index, view=0),
                       augment(view2, epoch, index, view=1)]).contiguous(memory_format=torch.channels_last)
        y = torch.cat([labels, labels])
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        loss, stats = loss_fn(distributed.gather_with_local_grad(out), distributed.gather_with_local_grad(y))
        optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        stats = {**stats, "grad_norm": gradient_norm(model)}
        optimizer.step()
        scheduler.step()
        for key, value in {"loss": loss.detach(), **stats}.items():
            progress.totals[key] = progress.totals.get(key, 0) + value
        progress.step += 1
        progress.images += labels.shape[0] * scale
        if hooked and (before + progress.step) % mid_epoch_every == 0 and progress.step < last_step:
            progress.elapsed_s = time.perf_counter() - start
            mid_epoch(progress)
    if progress.step == 0:
        raise ValueError("the training loader produced no batch: lower optim.global_batch_size or add data")
    elapsed = time.perf_counter() - start
    metrics = {f"train_{key}" if not key.startswith("train_") else key: (value / progress.step).item()
               for key, value in progress.totals.items()}
    metrics.update(lr=optimizer.param_groups[0]["lr"], epoch_time_s=elapsed, images_per_s=progress.images / elapsed)
    return metrics


@dataclass
class Training:
    """Everything one worker trains with, built from an ``ExperimentConfig``."""

    model: nn.Module  # possibly wrapped (DDP); ``unwrap(model)`` gives the plain module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_augment: nn.Module
    eval_preprocess: nn.Module
    train_batches: Iterable  # TwoViewLoader or TorchvisionTwoViewLoader
    amp_dtype: torch.dtype | None


def build_training(config: ExperimentConfig, files: PreparedDataset, device: torch.device,
                   wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
                   split: SplitIndices | None = None) -> Training:
    """Data, model, loss, optimiser and schedule for this worker; the global batch is split evenly and drawn
    from the training split's ``bank`` indices (``split``, default: as prepared)."""
    world = distributed.world_size()
    split = dataset_splits(config.data, files) if split is None else split
    local_batch = config.optim.global_batch_size // world
    if device.type == "cuda":  # fixed shapes: cuDNN picks its fastest kernels once (resume is bit-exact on CPU only)
        torch.backends.cudnn.benchmark = True
    d = config.data
    train_batches = train_loader(config, files, local_batch, world > 1, split)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config, files.num_classes).to(device, memory_format=torch.channels_last)
    model = wrap_model(model)
    if config.model.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, config.optim)
    steps_per_epoch = len(train_batches)
    o = config.optim
    scheduler = warmup_cosine(optimizer, o.warmup_epochs * steps_per_epoch, o.epochs * steps_per_epoch,
                              steps_per_epoch, o.warmup_start_lr, o.min_lr_ratio, o.cosine_per)
    train_augment = ColorAugment(files.channel_mean, files.channel_std, d.color_jitter_strength,
                                 d.color_jitter_prob, d.grayscale_prob, seed=config.seed).to(device)
    eval_preprocess = ColorAugment(files.channel_mean, files.channel_std).to(device)
    loss_fn = build_loss(config.loss, files.num_classes)
    return Training(model, loss_fn, optimizer, scheduler, train_augment, eval_preprocess, train_batches,
                    autocast_dtype(config.optim.precision, device))


def set_temperatures(loss_fn: nn.Module, config: ExperimentConfig, epoch: int) -> dict[str, float]:
    """Apply the temperature schedule's ``tau1`` and ``eps`` for ``epoch`` to a VarCon loss; returns them as
    metrics (none for other losses)."""
    if config.loss.name != "varcon":
        return {}
    temperatures = temperatures_at(config.loss, epoch, config.optim.epochs)
    loss_fn.tau1, loss_fn.eps = temperatures.tau1, temperatures.eps
    return {"tau1": temperatures.tau1, "eps": temperatures.eps}


def fit(config: ExperimentConfig, files: PreparedDataset, device: torch.device,
        on_epoch_end: Callable[[int, dict, Training], None],
        wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m, resume: dict | None = None,
        on_final_features: Callable[[FinalFeatures], None] | None = None,
        mid_epoch: Callable[[EpochProgress, Training], None] | None = None, mid_epoch_every: int = 0) -> Training:
    """Train until ``config.optim.epochs`` epochs are complete. ``on_epoch_end(epoch, metrics, training)`` runs on every
    rank after every epoch with the same metrics; epoch 0 reports the randomly initialised encoder. ``resume`` (a
    ``pipeline.checkpoint`` state) continues after its epoch, or within it from the step a mid-epoch state holds
    (the loader skips the batches already trained). ``mid_epoch(progress, training)`` runs on every rank after
    every ``mid_epoch_every``-th step of the training but an epoch's last. Every rank evaluates its shard
    (``pipeline.evaluator``): the validation monitor when due, the final evaluation after the last epoch, which
    first hands the gathered final split's features to ``on_final_features``; ``eval_time_s`` is logged beside
    ``epoch_time_s``. Each epoch first applies the temperature schedule. A NaN or infinite epoch loss raises
    ``NonFiniteLossError`` before that epoch is reported.
    """
    d = config.data
    files = staged(files, d.stage, os.path.expanduser(d.stage_dir), d.stage_limit_gb, d.verify_hash)
    split = dataset_splits(config.data, files)
    training = build_training(config, files, device, wrap_model, split)
    start = checkpoint.restore(training, resume) + 1 if resume else 1
    within = checkpoint.progress_of(resume, device) if resume else None
    if within is not None:
        training.train_batches.skip_next(within.step)
    evaluator = Evaluator(config, files, split, training.amp_dtype)
    last = config.optim.epochs
    if resume is None:
        began = time.perf_counter()
        metrics = evaluator.initial(training.model, training.eval_preprocess, device)
        on_epoch_end(0, {**metrics, "eval_time_s": time.perf_counter() - began} if metrics else {}, training)
    hook = (lambda progress: mid_epoch(progress, training)) if mid_epoch is not None else None
    for epoch in range(start, last + 1):
        temperatures = set_temperatures(training.loss_fn, config, epoch)
        metrics = train_one_epoch(training.model, training.train_batches, training.train_augment, training.loss_fn,
                                  training.optimizer, training.scheduler, device, training.amp_dtype, epoch,
                                  within if epoch == start else None, hook, mid_epoch_every)
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"training loss became {metrics['train_loss']} at epoch {epoch}: lower "
                                     f"optim.lr or check the data")
        metrics.update(temperatures)
        final_features = None
        began = time.perf_counter()
        if epoch == last:
            final_metrics, final_features = evaluator.final(training.model, training.eval_preprocess, device)
            metrics.update(final_metrics)
        else:
            metrics.update(evaluator.during(epoch, training.model, training.eval_preprocess, device))
        metrics["eval_time_s"] = time.perf_counter() - began
        if final_features is not None and on_final_features is not None:
            on_final_features(final_features)
        on_epoch_end(epoch, metrics, training)
    return training
