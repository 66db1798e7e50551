"""What a training evaluates when, on which split, under which name; every rank takes part.

Splits (``pipeline.data.splits``): ``bank`` (the training split minus validation: the kNN memory bank and the
probes' training set), ``val`` (what selects: the monitor, hence the best checkpoint and a sweep's scheduler),
``test`` (the dataset's test split: evaluated after the last epoch, as a curve only with
``eval.test_every_epochs``, and never selecting; with ``eval.final_split=val`` never read at all, the final
dispersion, few-shot episodes and plots then on validation). Every metric is named after its split:
``val_knn_top1_k20``, ``test_knn_top1_k20``, ``test_probe_top1``, ``test_dispersion_intra_cos``, ...
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.data.loaders import eval_loaders, train_loader
from pipeline.data.prepare import PreparedDataset
from pipeline.data.splits import SplitIndices
from pipeline.evaluation import Shard, accuracy, dispersion, extract_features, few_shot_ncm, knn_neighbours, knn_vote
from pipeline.models import unwrap
from pipeline.probes import linear_probe, reference_probe, reference_probe_lr

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The plain encoder in eval mode (BatchNorm on its running statistics) for the block, then as it was. Every
    rank first takes rank 0's buffers (``distributed.broadcast_buffers``): the ranks evaluate one encoder, the one
    rank 0 checkpoints, so ``varcon eval`` of that checkpoint reproduces the run's figures."""
    encoder = unwrap(model)
    distributed.broadcast_buffers(encoder)
    was_training = encoder.training
    encoder.eval()
    try:
        yield encoder
    finally:
        encoder.train(was_training)


@dataclass
class FinalFeatures:
    """The whole final split after training (``split``: test, or validation with ``eval.final_split=val``;
    gathered from the ranks, in file order): unit encoder features ``[N, F]``, labels ``[N]`` and the kNN
    predictions ``[N]`` with ``knn_k`` neighbours (for plots)."""

    features: torch.Tensor
    labels: torch.Tensor
    knn_predictions: torch.Tensor
    knn_k: int
    split: str = "test"


class Evaluator:
    """Evaluation of the encoder's features for one training, sharded over the ranks (every rank calls every
    method). ``initial`` before training, ``during`` after each epoch but the last, ``final`` after it."""

    def __init__(self, config: ExperimentConfig, files: PreparedDataset, split: SplitIndices,
                 amp_dtype: torch.dtype | None = None, batch_size: int = 512) -> None:
        self.config, self.files, self.split, self.amp_dtype = config, files, split, amp_dtype
        self.eval_config, self.num_classes, self.seed = config.eval, files.num_classes, config.seed
        self.has_validation = len(split.val) > 0
        self.batch_size = batch_size
        self.distributed = distributed.world_size() > 1
        self.final_split = config.eval.final_split
        indices = {"bank": split.bank, **({"test": None} if self.final_split == "test" else {}),
                   **({"val": split.val} if self.has_validation else {})}
        self.loaders = eval_loaders(config, files, batch_size, self.distributed, indices)

    def monitor_due(self, epoch: int) -> bool:
        """Whether the validation monitor runs after ``epoch`` (the last epoch always evaluates it)."""
        e = self.eval_config
        if not self.has_validation:
            return False
        return epoch in e.at_epochs if e.at_epochs else epoch % e.every_epochs == 0

    def _shards(self, model: nn.Module, preprocess: nn.Module, device: torch.device, loaders: dict) -> dict:
        with frozen(model) as encoder:
            return {name: extract_features(encoder.features, loader, loader.num_samples, preprocess, device,
                                           self.amp_dtype) for name, loader in loaders.items()}

    def _knn(self, bank: Shard, queries: Shard, split: str) -> tuple[dict[str, float], torch.Tensor]:
        """``<split>_knn_top1_k<k>`` for every k, and this rank's predictions with the first k."""
        e = self.eval_config
        sims, labels = knn_neighbours(queries, bank, max(e.knn_k))
        metrics, first = {}, None
        for k in e.knn_k:
            predicted = knn_vote(sims[:, :k], labels[:, :k], e.knn_temperature, self.num_classes)
            metrics[f"{split}_knn_top1_k{k}"] = accuracy(predicted == queries.labels, queries.total)
            first = predicted if first is None else first
        return metrics, first

    def initial(self, model: nn.Module, preprocess: nn.Module, device: torch.device) -> dict[str, float]:
        """The monitor of the untrained encoder: on a seeded ``eval.initial_fraction`` of bank and validation
        (none without validation or at 0)."""
        fraction = self.eval_config.initial_fraction
        if not self.has_validation or fraction == 0:
            return {}
        loaders = {name: self.loaders[name] for name in ("bank", "val")}
        if fraction < 1:
            rng = np.random.default_rng(self.seed)
            chosen = {name: np.sort(rng.choice(ids, max(1, round(fraction * len(ids))), replace=False))
                      for name, ids in (("bank", self.split.bank), ("val", self.split.val))}
            loaders = eval_loaders(self.config, self.files, self.batch_size, self.distributed, chosen)
        shards = self._shards(model, preprocess, device, loaders)
        return {**self._knn(shards["bank"], shards["val"], "val")[0], "initial_eval_fraction": fraction}

    def during(self, epoch: int, model: nn.Module, preprocess: nn.Module, device: torch.device) -> dict[str, float]:
        """After an epoch before the last: the validation monitor when due, the test curve when asked."""
        names = ["val"] if self.monitor_due(epoch) else []
        every = self.eval_config.test_every_epochs
        if every and epoch % every == 0:
            names.append("test")
        if not names:
            return {}
        shards = self._shards(model, preprocess, device, {n: self.loaders[n] for n in ("bank", *names)})
        metrics = {}
        for name in names:
            metrics.update(self._knn(shards["bank"], shards[name], name)[0])
        return metrics

    def final(self, model: nn.Module, preprocess: nn.Module,
              device: torch.device) -> tuple[dict[str, float], FinalFeatures]:
        """After the last epoch: kNN on validation and test, dispersion, the probes (``eval.probe``) and
        few-shot episodes on the final split (``eval.final_split``: test; val leaves the test split unread), and
        its gathered features for plots. The reference probe runs
        ``eval.reference_probe_batch_per_worker`` images per worker per step at ``eval.reference_probe_lr`` scaled
        from ``eval.reference_probe_lr_batch`` to that global batch; both are reported beside its top-1
        (``refprobe_lr``, ``refprobe_global_batch``). One process (``varcon eval``) takes the run's global batch,
        per worker x ``ray.num_workers``, so that it trains the probe the run trained."""
        e = self.eval_config
        shards = self._shards(model, preprocess, device, self.loaders)
        target = self.final_split
        bank, final = shards["bank"], shards[target]
        evaluated = {name: shards[name] for name in ("val", "test") if name in shards}
        metrics, predicted = {}, None
        for name, shard in evaluated.items():
            found, first = self._knn(bank, shard, name)
            metrics.update(found)
            predicted = first if name == target else predicted
        metrics.update({f"{target}_{key}": value for key, value in dispersion(final, self.num_classes).items()})
        if e.probe in ("features", "both") and e.linear_probe_epochs:
            metrics.update(linear_probe(bank, evaluated, self.num_classes, epochs=e.linear_probe_epochs,
                                        seed=self.seed))
        if e.probe in ("reference", "both"):
            workers = distributed.world_size() if self.distributed else self.config.ray.num_workers
            global_batch = e.reference_probe_batch_per_worker * workers
            lr = reference_probe_lr(e.reference_probe_lr, e.reference_probe_lr_batch, global_batch)
            batches = train_loader(self.config, self.files, global_batch // distributed.world_size(),
                                   self.distributed, self.split)
            with frozen(model) as encoder:  # BatchNorm keeps its running statistics, as in the reference
                metrics.update(reference_probe(encoder.features, batches, preprocess, device, self.amp_dtype,
                                               evaluated, self.num_classes, e.reference_probe_epochs, lr,
                                               seed=self.seed))
            metrics.update(refprobe_lr=lr, refprobe_global_batch=float(global_batch))  # beside its top-1
        gathered = self._gather(final, predicted)
        for shots in (1, 5) if e.few_shot_episodes else ():
            metrics[f"{target}_fewshot_5way_{shots}shot"] = few_shot_ncm(
                gathered.features, gathered.labels, shots=shots, episodes=e.few_shot_episodes, seed=self.seed)
        return metrics, gathered

    def _gather(self, shard: Shard, predicted: torch.Tensor) -> FinalFeatures:
        index = distributed.all_gather_uneven(shard.index)
        order = index.argsort()
        features, labels, predictions = (distributed.all_gather_uneven(t)[order]
                                         for t in (shard.features, shard.labels, predicted))
        return FinalFeatures(features.cpu(), labels.cpu(), predictions.cpu(), self.eval_config.knn_k[0],
                             self.final_split)
