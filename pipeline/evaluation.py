"""Evaluation of a trained encoder: features, weighted kNN, linear probe, few-shot, dispersion."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(features_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                     preprocess: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
    """Unit-normalised encoder features ``[N, F]`` and labels ``[N]`` of every sample in ``batches``."""
    feats, labels = [], []
    for images, y in batches:
        x = preprocess(images.to(device)).contiguous(memory_format=torch.channels_last)
        feats.append(F.normalize(features_fn(x).float(), dim=1))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
                temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Class predictions ``[Q]`` of a cosine-similarity kNN classifier with weighted vote (Wu et al., 2018).

    For each query q: the k most similar training features s_1..s_k vote for their class with weight
    exp(s_j / temperature); the class with the largest total wins. Features are unit-normalised ``[N, F]``.
    """
    k = min(k, train_feats.shape[0])
    predictions = []
    for start in range(0, test_feats.shape[0], chunk_size):
        sims = test_feats[start:start + chunk_size] @ train_feats.T  # [q, N_train]
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()  # [q, k]
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else test_feats.new_zeros(0, dtype=torch.long)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """One linear layer on frozen features ``[N, F]``, SGD (momentum 0.9, cosine LR), ``epochs`` epochs.

    Features are standardised per dimension with the training split's mean and std first (a BatchNorm without
    affine parameters, as MoCo v3 and MAE probe), which makes one learning rate fit every encoder.
    Reports the **final** epoch's test top-1/top-5 (never the best epoch on the test set).
    """
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    train_feats, test_feats = (train_feats - mean) / std, (test_feats - mean) / std
    gen = torch.Generator().manual_seed(seed)
    device = train_feats.device
    layer = torch.nn.Linear(train_feats.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = max(1, -(-train_feats.shape[0] // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(train_feats.shape[0], generator=gen).to(device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(layer(train_feats[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        top5 = layer(test_feats).topk(min(5, num_classes), dim=1).indices
    hits = top5 == test_labels[:, None]
    return {"probe_top1": hits[:, 0].float().mean().item(), "probe_top5": hits.any(1).float().mean().item()}


@torch.no_grad()
def few_shot_ncm(feats: torch.Tensor, labels: torch.Tensor, ways: int = 5, shots: int = 1, queries: int = 15,
                 episodes: int = 200, seed: int = 0) -> float:
    """Mean accuracy of nearest-class-mean classification over random ``ways``-way ``shots``-shot episodes.

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
def dispersion(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Mean cosine of unit features to their class centroid (intra-class compactness) and mean pairwise
    cosine between distinct class centroids (inter-class spread; lower is more dispersed).
    """
    onehot = F.one_hot(labels, num_classes).to(feats.dtype)  # [N, K]
    present = onehot.sum(0) > 0
    centroids = F.normalize(onehot.T @ feats, dim=1)[present]  # [C, F]
    own = F.normalize(onehot.T @ feats, dim=1)[labels]
    intra = (feats * own).sum(1).mean().item()
    c = centroids.shape[0]
    pairwise = centroids @ centroids.T
    inter = ((pairwise.sum() - pairwise.diagonal().sum()) / max(1, c * (c - 1))).item()
    return {"dispersion_intra_cos": intra, "dispersion_inter_cos": inter}
