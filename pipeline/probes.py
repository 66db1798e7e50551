"""Linear probes on a frozen encoder, sharded over the ranks: the features probe (a linear layer on the
standardised features of the training split, gathered once and trained as one process on every rank:
``fit_features_probe``, no collective per step) and the papers' reference probe (a linear layer on the raw
features of the training crops, one all-reduce per step: ``fit_reference_probe``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.data.transfer import to_device
from pipeline.evaluation import NO_INDEX, Shard, _feature_dim


def _probe_layer(dim: int, num_classes: int, seed: int, device: torch.device) -> torch.nn.Linear:
    """``nn.Linear``'s default initialisation drawn from a generator of its own (the same on every rank)."""
    layer = torch.nn.Linear(dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / dim ** 0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer.to(device)


def _gradient_bucket(module: torch.nn.Module) -> torch.Tensor:
    """One zeroed flat buffer ``[P]`` of which every parameter's ``.grad`` is a view (DDP's
    ``gradient_as_bucket_view``): backward accumulates into it in place, one all-reduce averages every gradient."""
    params = list(module.parameters())
    bucket = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
    offset = 0
    for p in params:
        p.grad = bucket[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return bucket


def _hit_counts(layer: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    """This rank's top-1 and top-5 hits ``[2]`` (float64, on the device: nothing waits for them)."""
    with torch.no_grad():
        top5 = layer(features).topk(min(5, num_classes), dim=1).indices if len(labels) else \
            labels.new_zeros(0, min(5, num_classes))
    hits = top5 == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).to(torch.float64)


def _top1_top5(layer: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, total: int,
               num_classes: int) -> tuple[float, float]:
    top1, top5 = distributed.all_sum(_hit_counts(layer, features, labels, num_classes)).tolist()
    return top1 / max(1, total), top5 / max(1, total)


def _standardisation(train: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std ``[F]`` of the whole training split's unit features (float64 sums over the
    ranks, returned as float32)."""
    x = train.features.double()
    n = float(train.total)
    mean = distributed.all_sum(x.sum(0)) / n
    var = (distributed.all_sum(((x - mean) ** 2).sum(0)) / max(1.0, n - 1)).clamp_min(1e-12)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def _whole_split(train: Shard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training split's unit features of every rank in one fresh buffer ``[R, F]`` (R >= total: each rank's
    rows padded to the largest shard), the labels ``[R]``, and ``rows`` ``[total]``: the buffer row of the
    split's i-th sample by global index, i.e. the row that a single process holding the whole split in index
    order keeps at i. One all-gather per tensor, once."""
    if not distributed.is_distributed():
        return train.features.clone(), train.labels, train.index.argsort()
    device = train.features.device
    world, largest = distributed.world_size(), max(distributed.all_sizes(len(train.index), device))
    dim = _feature_dim(train)

    def gathered(local: torch.Tensor, pad_value: float) -> torch.Tensor:
        padded = local.new_full((largest, *local.shape[1:]), pad_value)
        padded[:len(local)] = local
        out = local.new_empty((world * largest, *local.shape[1:]))
        getattr(torch.distributed, "all_gather_single", torch.distributed.all_gather_into_tensor)(out, padded)
        return out

    local = train.features if train.features.shape[1:] == (dim,) else train.features.new_zeros(0, dim)
    index = gathered(train.index, NO_INDEX)  # padding rows sort after every real sample
    return gathered(local, 0.0), gathered(train.labels, 0), index.argsort()[:train.total]


def fit_features_probe(train: Shard, num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                       seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """The features probe's layer and the standardisation's mean and std ``[F]`` (``linear_probe``).

    Every rank gathers the whole training split's features once and runs the single-process probe on them: the
    same permutation (a host generator seeded with ``seed``, copied to the device once per epoch), the same
    ``batch_size``-sample steps, so every rank ends with the layer that one process holding the split would train,
    to float rounding, and the step loop has no collective and no host sync. Memory: the split's float32 features
    on every rank, ``total x F x 4`` bytes (ImageNet-1K's bank, 1.27 M x 2048: 10.4 GB, which fits beside the
    frozen encoder and the shards on a 40 GB A100) for the probe's duration.

    ImageNet-1K takes ~500 k steps of a small layer, so each step is eight kernels written out, not autograd and
    ``torch.optim`` (~1 ms a step on an H200's host, against 0.12-0.15 ms written out): the cross-entropy's
    gradient with respect to the logits, ``(softmax - onehot) / n``, then PyTorch's SGD with momentum 0.9
    (``buf = 0.9 buf + g``, the first step ``buf = g``; ``w -= lr_t buf``) under the cosine schedule
    ``lr_t = lr (1 + cos(pi t / T)) / 2`` over the T steps, on weight and bias held in one flat tensor.
    """
    device = train.features.device
    mean, std = _standardisation(train)
    feats, labels, rows = _whole_split(train)
    feats.sub_(mean).div_(std)
    total, dim = train.total, feats.shape[1]
    layer = _probe_layer(dim, num_classes, seed, device)
    theta = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])  # [K*F + K]
    weight, bias = theta[:num_classes * dim].view(num_classes, dim), theta[num_classes * dim:]
    momentum = torch.zeros_like(theta)
    momentum_weight, momentum_bias = momentum[:num_classes * dim].view(num_classes, dim), momentum[num_classes * dim:]
    minus_one, ones = torch.full((batch_size, 1), -1.0, device=device), torch.ones(batch_size, device=device)
    steps_per_epoch = max(1, -(-total // batch_size))
    gen, step_count = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for _ in range(epochs):
            order = rows[to_device(torch.randperm(total, generator=gen), device)]
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                n = max(1, len(idx))
                x, y = feats.index_select(0, idx), labels.index_select(0, idx)
                grad = torch.addmm(bias, x, weight.t()).softmax(1)  # d(mean CE)/d(logits) x n: softmax - onehot
                grad.scatter_add_(1, y[:, None], minus_one[:len(idx)])
                momentum_weight.addmm_(grad.t(), x, beta=0.9, alpha=1.0 / n)
                momentum_bias.addmv_(grad.t(), ones[:len(idx)], beta=0.9, alpha=1.0 / n)
                lr_now = lr * 0.5 * (1.0 + math.cos(math.pi * step_count / (epochs * steps_per_epoch)))
                theta.add_(momentum, alpha=-lr_now)
                step_count += 1
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer, mean, std


def linear_probe(train: Shard, evaluated: dict[str, Shard], num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """One linear layer on frozen unit features, SGD (momentum 0.9, cosine LR), ``epochs`` epochs of
    ``batch_size``-sample steps over the whole training split, whatever the number of ranks.

    Features are standardised per dimension with the training split's mean and std first (a BatchNorm without
    affine parameters, as MoCo v3 and MAE probe), which makes one learning rate fit every encoder. The layer is the
    single-process probe's on every rank (``fit_features_probe``: the training split gathered once). Returns the
    **final** epoch's ``<split>_probe_top1/top5`` for each split of ``evaluated`` (each rank scores its shard).
    """
    layer, mean, std = fit_features_probe(train, num_classes, epochs, lr, batch_size, seed)
    metrics = {}
    for split, shard in evaluated.items():
        top1, top5 = _top1_top5(layer, (shard.features - mean) / std, shard.labels, shard.total, num_classes)
        metrics.update({f"{split}_probe_top1": top1, f"{split}_probe_top5": top5})
    return metrics


def reference_probe_lr(lr: float, at_batch: int, global_batch: int) -> float:
    """The reference probe's learning rate for ``global_batch`` images per step: ``lr`` given at ``at_batch``,
    scaled linearly (the reference: 5.0 at 1,024 = 8 GPUs x 128)."""
    return lr * global_batch / at_batch


class FrozenForward:
    """``features_fn(x).float()`` of a frozen encoder under ``amp_dtype`` autocast, without gradient.

    On a GPU (``cuda_graph``), the forward at the first batch's shape is captured once as a CUDA graph and replayed
    for every batch of that shape (the training loader's are all one shape): one replay launches the whole encoder,
    where the eager forward launches some hundreds of kernels from the host, which takes longer than the GPU's work
    at small batches, and on a slow host even at 128 (an H200, ResNet-50, bf16, a reference probe step, two
    machines: 10.3-14.8 ms eager vs 0.9-1.2 ms replayed at 8 images, 9.7-15.4 vs 9.1-9.7 ms at 128;
    ``bench/eval_cost.py``). Other shapes, and CPUs, run eagerly. The tensor returned from a replay is the graph's
    output buffer: use it before the next call.
    """

    def __init__(self, features_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 amp_dtype: torch.dtype | None, cuda_graph: bool = True) -> None:
        self.features_fn, self.device, self.amp_dtype = features_fn, device, amp_dtype
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.captured: tuple | None = None  # (graph, static input, static output)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                             enabled=self.amp_dtype is not None, cache_enabled=False):
            return self.features_fn(x).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            return self.eager(x)
        if self.captured is None:
            self.captured = self._capture(x)
        graph, static_in, static_out = self.captured
        if x.shape != static_in.shape or x.stride() != static_in.stride():
            return self.eager(x)
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor) -> tuple:
        static_in = x.clone()  # keeps the channels-last strides
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the capture: cuDNN picks its algorithms, the allocator its blocks
                self.eager(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread may query events
            static_out = self.eager(static_in)
        return graph, static_in, static_out


def fit_reference_probe(features_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                        preprocess: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                        amp_dtype: torch.dtype | None, dim: int, num_classes: int, epochs: int, lr: float,
                        seed: int = 0, after_epoch: Callable[[torch.nn.Module], None] | None = None,
                        cuda_graph: bool = True) -> torch.nn.Linear:
    """The reference probe's layer (``reference_probe``), calling ``after_epoch(layer)`` after each epoch.

    Each step's loss is the mean cross-entropy over the global batch (every rank's ``batches`` yields the same
    number of images per step: the training loader drops the last incomplete batch), so ``world`` ranks of ``b``
    images give the step of one process with ``world x b``. The gradients of weight and bias are views of one
    buffer, averaged with one all-reduce per step; the step loop has no host sync. On a GPU the frozen forward
    is replayed from a CUDA graph (``FrozenForward``; ``cuda_graph=False``: eager).
    """
    forward = FrozenForward(features_fn, device, amp_dtype, cuda_graph)
    layer = _probe_layer(dim, num_classes, seed, device)
    bucket = _gradient_bucket(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    milestones = sorted({max(1, round(epochs * share)) for share in (0.6, 0.75, 0.9)})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.2)
    world = distributed.world_size()
    for _ in range(epochs):
        for view1, _, labels, _ in batches:
            with torch.no_grad():
                x = preprocess(to_device(view1, device)).contiguous(memory_format=torch.channels_last)
            logits = layer(forward(x))
            loss = F.cross_entropy(logits, to_device(labels, device), reduction="sum") / (len(labels) * world)
            bucket.zero_()
            loss.backward()
            distributed.all_sum(bucket)
            optimizer.step()
        schedule.step()
        if after_epoch is not None:
            after_epoch(layer)
    return layer


def reference_probe(features_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                    preprocess: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                    amp_dtype: torch.dtype | None, evaluated: dict[str, Shard], num_classes: int, epochs: int,
                    lr: float, seed: int = 0, cuda_graph: bool = True) -> dict[str, float]:
    """The papers' linear evaluation (SupContrast's ``main_linear.py``, which VarCon's code keeps): a linear
    layer on the frozen encoder's raw features of the training crops (``batches``: the two-view loader, first
    view, flips and crops, no colour jitter), SGD momentum 0.9 without weight decay, ``lr`` (as given: for the
    global batch, every rank's batch x the ranks) x0.2 at 60%, 75% and 90% of ``epochs``.

    Returns ``<split>_refprobe_top1`` of the final epoch for each split of ``evaluated``, and, as the papers
    report it, the best test epoch's top-1 as ``test_refprobe_top1_best_epoch_test_selected``: selected on the
    test split, for comparison with published figures only; nothing in the pipeline selects by it. Each epoch's
    hits stay on the device and are summed over the ranks once, at the end.
    """
    dim = _feature_dim(next(iter(evaluated.values())))
    held = {split: (shard.raw(), shard.labels) for split, shard in evaluated.items()}
    counts: list[torch.Tensor] = []  # per epoch: [splits, 2] hits of this rank

    def score(layer: torch.nn.Module) -> None:
        counts.append(torch.stack([_hit_counts(layer, feats, labels, num_classes) for feats, labels in
                                   held.values()]))

    fit_reference_probe(features_fn, batches, preprocess, device, amp_dtype, dim, num_classes, epochs, lr, seed,
                        after_epoch=score, cuda_graph=cuda_graph)
    top1 = distributed.all_sum(torch.stack(counts)[:, :, 0].contiguous()).tolist()  # [epochs][splits]
    curves = {split: [row[s] / max(1, shard.total) for row in top1]
              for s, (split, shard) in enumerate(evaluated.items())}
    metrics = {f"{split}_refprobe_top1": curve[-1] for split, curve in curves.items()}
    if "test" in curves:
        metrics["test_refprobe_top1_best_epoch_test_selected"] = max(curves["test"])
    return metrics
