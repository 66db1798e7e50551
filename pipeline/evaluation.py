"""Evaluation of a trained encoder: feature extraction and the weighted kNN monitor."""
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
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int, temperature: float, num_classes: int,
             chunk_size: int = 1024) -> float:
    """Top-1 accuracy of a cosine-similarity kNN classifier with weighted vote (Wu et al., 2018).

    For each query q: the k most similar training features s_1..s_k vote for their class with weight
    exp(s_j / temperature); the class with the largest total wins. Features are unit-normalised ``[N, F]``.
    """
    k = min(k, train_feats.shape[0])
    correct = 0
    for start in range(0, test_feats.shape[0], chunk_size):
        sims = test_feats[start:start + chunk_size] @ train_feats.T  # [q, N_train]
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()  # [q, k]
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(1) == test_labels[start:start + chunk_size]).sum().item()
    return correct / max(test_feats.shape[0], 1)
