"""Evaluation of a frozen encoder, sharded over the ranks: features, weighted kNN, few-shot, dispersion (the
linear probes: ``pipeline.probes``).

Every rank holds the features of a disjoint shard of each split (``Shard``) and results are reduced over the
ranks. Without ``torch.distributed`` (or with one rank)
the same code is the single-process evaluation. Nothing here touches the global RNG: evaluation settings never
change the training trajectory.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.data.transfer import to_device

NO_INDEX = 2**52  # the global index of a padding candidate: after every real one, exact in float64


@dataclass
class Shard:
    """This rank's part of one split: unit features ``[n, F]`` (float32), their norms before normalisation
    ``[n]``, labels ``[n]`` and global sample indices ``[n]`` in ascending order; ``total`` counts the split
    over all ranks."""

    features: torch.Tensor
    norms: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    total: int

    @classmethod
    def whole(cls, features: torch.Tensor, labels: torch.Tensor) -> Shard:
        """A split held by one process, in the given order (tests, single-process tools)."""
        norms = features.norm(dim=1)
        return cls(F.normalize(features, dim=1), norms, labels, torch.arange(len(labels), device=labels.device),
                   len(labels))

    def raw(self) -> torch.Tensor:
        """The encoder's features as they came out ``[n, F]`` (the reference probe trains on these)."""
        return self.features * self.norms[:, None]


@torch.no_grad()
def extract_features(features_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, total: int,
                     preprocess: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> Shard:
    """The features of this rank's shard of ``batches`` (``(images, labels, index)`` of a split of ``total``
    samples, read every ``world``-th sample as ``DistributedSampler`` does) under ``amp_dtype`` autocast.

    The sampler pads the split to a multiple of the world size by repeating its first samples at the end of the
    last ranks' orders: rank r keeps its first ``len(range(r, total, world))`` rows, which leaves every sample
    exactly once over the ranks (checked by global index).
    """
    feats, labels, index = [], [], []
    for images, y, i in batches:
        x = preprocess(to_device(images, device)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = features_fn(x)
        feats.append(out.float())
        labels.append(to_device(y, device))
        index.append(to_device(i, device))
    keep = len(range(distributed.rank(), total, distributed.world_size()))
    raw = torch.cat(feats)[:keep] if feats else torch.zeros(0, 0, device=device)
    labels = torch.cat(labels)[:keep] if labels else torch.zeros(0, dtype=torch.long, device=device)
    index = torch.cat(index)[:keep] if index else torch.zeros(0, dtype=torch.long, device=device)
    if len(index) != keep or len(torch.unique(index)) != keep:
        raise RuntimeError(f"rank {distributed.rank()} read {len(index)} samples ({len(torch.unique(index))} "
                           f"distinct) of a split of {total}, expected {keep}: the loader's sharding changed")
    order = index.argsort()
    raw, labels, index = raw[order], labels[order], index[order]
    return Shard(F.normalize(raw, dim=1), raw.norm(dim=1), labels, index, total)


def _feature_dim(shard: Shard) -> int:
    """F of the split's features over the ranks (a rank with an empty shard holds ``[0, 0]``)."""
    if not distributed.is_distributed():
        return shard.features.shape[1]
    dim = torch.tensor([shard.features.shape[1] if shard.features.numel() else 0], device=shard.features.device)
    torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
    return int(dim.item())


def _local_candidates(queries: torch.Tensor, bank: Shard, k: int):
    """This rank's k best bank samples for each query ``[m, F]``, by (similarity desc, global index asc):
    similarities, global indices and labels, each ``[m, k]`` (padded with -inf / ``NO_INDEX`` when the shard
    holds fewer than k)."""
    m, n = queries.shape[0], bank.features.shape[0]
    take = min(k, n)
    if take == 0:
        top = queries.new_full((m, 0), float("-inf"))
        pos = torch.zeros(m, 0, dtype=torch.long, device=queries.device)
    else:
        sims = queries @ bank.features.T  # [m, n]
        if n > take:
            top, pos = sims.topk(take + 1, dim=1)
            tied = top[:, take - 1] == top[:, take]  # the k-th place is shared: the topk set is not unique
            top, pos = top[:, :take].contiguous(), pos[:, :take].contiguous()
            if tied.any():  # a stable sort keeps equal similarities in bank (= global index) order
                rows = tied.nonzero().squeeze(1)
                ordered = sims[rows].sort(dim=1, descending=True, stable=True)
                top[rows], pos[rows] = ordered.values[:, :take], ordered.indices[:, :take]
        else:
            top, pos = sims.sort(dim=1, descending=True, stable=True)
    index, labels = bank.index[pos], bank.labels[pos]
    if take < k:
        pad = k - take
        top = torch.cat([top, top.new_full((m, pad), float("-inf"))], 1)
        index = torch.cat([index, index.new_full((m, pad), NO_INDEX)], 1)
        labels = torch.cat([labels, labels.new_zeros((m, pad))], 1)
    return top, index, labels


def _best_k(sims: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, k: int):
    """The first k of candidates ``[m, c]`` in the order (similarity desc, global index asc): similarities and
    labels ``[m, k]``. A top-k by similarity decides every row without equal similarities at or inside its k-th
    place; the rows with such ties are ordered exactly by (similarity, index) with two stable sorts."""
    c = sims.shape[1]
    top, pos = sims.topk(min(k + 1, c), dim=1)
    tied = (top[:, 1:] == top[:, :-1]).any(1) if top.shape[1] > 1 else torch.zeros(len(top), dtype=torch.bool,
                                                                                   device=top.device)
    top, pos = top[:, :k].contiguous(), pos[:, :k].contiguous()
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        by_index = index[rows].argsort(dim=1, stable=True)
        row_sims = sims[rows].gather(1, by_index)
        order = row_sims.argsort(dim=1, descending=True, stable=True)[:, :k]
        top[rows], pos[rows] = row_sims.gather(1, order), by_index.gather(1, order)
    return top, labels.gather(1, pos)


@torch.no_grad()
def knn_neighbours(queries: Shard, bank: Shard, k: int, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query of this rank's shard, its k most cosine-similar samples of the whole bank, ordered by
    (similarity desc, global index asc): similarities and labels ``[n_q, k]`` (k capped at the bank's size).

    No rank holds more than its own bank shard. In each round every rank contributes its next
    ``chunk_size / world`` queries; all of them are gathered, every rank scores them against its shard and sends
    each owner its k best (all-to-all), and each owner merges the ``world x k`` candidates of its own queries:
    every rank works every round, and memory beyond the shards is O(chunk_size x k x world).
    """
    k = min(k, bank.total)
    world = distributed.world_size()
    device = queries.features.device
    sizes = distributed.all_sizes(queries.features.shape[0], device)
    dim = _feature_dim(bank)
    per_rank = max(1, chunk_size // world)
    mine = sizes[distributed.rank()]
    out_sims, out_labels = [], []
    for start in range(0, max(sizes), per_rank):
        rows = max(min(per_rank, s - start) for s in sizes)  # the round's rows per rank (padded to this)
        block = torch.zeros(rows, dim, device=device)
        own = queries.features[start:start + rows]
        block[:len(own)] = own
        blocks = distributed.all_gather_cat(block)  # [world * rows, F]: every rank's queries of this round
        sims, index, labels = _local_candidates(blocks, bank, k)
        # similarities (float32), indices and labels are exact in float64: one tensor per exchange
        packed = torch.stack([sims.double(), index.double(), labels.double()]).view(3, world, rows, k)
        received = distributed.all_to_all(packed.permute(1, 0, 2, 3).contiguous())  # [world (from), 3, rows, k]
        merged = received.permute(1, 2, 0, 3).reshape(3, rows, world * k)[:, :max(0, min(rows, mine - start))]
        best_sims, best_labels = _best_k(merged[0].float(), merged[1].long(), merged[2].long(), k)
        out_sims.append(best_sims)
        out_labels.append(best_labels)
    if not out_sims:
        return torch.zeros(0, k, device=device), torch.zeros(0, k, dtype=torch.long, device=device)
    return torch.cat(out_sims), torch.cat(out_labels)


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Class predictions ``[n]`` of a weighted vote (Wu et al., 2018): each neighbour j of ``[n, k]`` votes for
    its class with weight exp(s_j / temperature); the class with the largest total wins."""
    votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    votes.scatter_add_(1, labels, (sims / temperature).exp())
    return votes.argmax(1)


def knn_predict(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor, k: int,
                temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Single-process kNN predictions ``[Q]`` for unit query features ``[Q, F]`` against a unit bank ``[N, F]``."""
    queries = Shard.whole(query_feats, torch.zeros(len(query_feats), dtype=torch.long))
    sims, labels = knn_neighbours(queries, Shard.whole(bank_feats, bank_labels), k, chunk_size)
    return knn_vote(sims, labels, temperature, num_classes)


def accuracy(hits: torch.Tensor, total: int) -> float:
    """The share of ``True`` in this rank's ``hits`` summed over the ranks, of ``total``."""
    count = distributed.all_sum(hits.sum().reshape(1).to(torch.float64))
    return float(count.item()) / max(1, total)


@torch.no_grad()
def few_shot_ncm(feats: torch.Tensor, labels: torch.Tensor, ways: int = 5, shots: int = 1, queries: int = 15,
                 episodes: int = 200, seed: int = 0) -> float:
    """Mean accuracy of nearest-class-mean classification over random ``ways``-way ``shots``-shot episodes on
    unit features ``[N, F]`` held whole (the gathered test split).

    Each episode draws ``ways`` classes with at least ``shots + queries`` samples, averages the unit features
    of ``shots`` supports per class and assigns ``queries`` per class to the most cosine-similar mean.
    """
    gen = torch.Generator().manual_seed(seed)
    labels_cpu = labels.cpu()
    classes = [c for c in labels_cpu.unique().tolist() if (labels_cpu == c).sum() >= shots + queries]
    if len(classes) < ways:
        return float("nan")
    accuracies = []
    for _ in range(episodes):
        chosen = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:ways].tolist()]
        means, query_feats, query_labels = [], [], []
        for way, c in enumerate(chosen):
            members = (labels_cpu == c).nonzero().squeeze(1)
            picks = members[torch.randperm(len(members), generator=gen)[:shots + queries]]
            means.append(F.normalize(feats[picks[:shots]].mean(0), dim=0))
            query_feats.append(feats[picks[shots:]])
            query_labels += [way] * queries
        predicted = (torch.cat(query_feats) @ torch.stack(means).T).argmax(1).cpu()
        accuracies.append((predicted == torch.tensor(query_labels)).float().mean().item())
    return sum(accuracies) / len(accuracies)


@torch.no_grad()
def dispersion(shard: Shard, num_classes: int) -> dict[str, float]:
    """Mean cosine of unit features to their class centroid (intra-class compactness) and mean pairwise
    cosine between distinct class centroids (inter-class spread; lower is more dispersed), over all ranks:
    centroid_c = normalise(sum of the class's features over the ranks)."""
    onehot = F.one_hot(shard.labels, num_classes).to(torch.float32)  # [n, K]
    sums = distributed.all_sum(onehot.T @ shard.features if len(shard.labels) else
                               torch.zeros(num_classes, _feature_dim(shard), device=shard.features.device))
    counts = distributed.all_sum(onehot.sum(0))
    centroids = F.normalize(sums, dim=1)
    intra_sum = (shard.features * centroids[shard.labels]).sum().reshape(1).to(torch.float64)
    intra = float(distributed.all_sum(intra_sum).item()) / max(1, shard.total)
    present = centroids[counts > 0]  # [C, F]
    c = present.shape[0]
    pairwise = present @ present.T
    inter = ((pairwise.sum() - pairwise.diagonal().sum()) / max(1, c * (c - 1))).item()
    return {"dispersion_intra_cos": intra, "dispersion_inter_cos": inter}
