"""PNG figures of a training: embeddings, kNN confusion matrix, learning curves, temperature schedule.

Matplotlib's non-interactive Agg backend only; no Ray, no MLflow. Histories are ``{metric: [(epoch, value)]}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

History = dict[str, list[tuple[int, float]]]


def _subsample(features: np.ndarray, labels: np.ndarray, max_points: int, seed: int):
    if len(labels) <= max_points:
        return features, labels
    keep = np.random.default_rng(seed).choice(len(labels), max_points, replace=False)
    return features[keep], labels[keep]


def embed_2d(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``[N, F] -> [N, 2]`` by PCA, or by t-SNE on the first 50 principal components."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    reduced = PCA(n_components=min(50, *features.shape), random_state=seed).fit_transform(features)
    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def embedding_plot(features: np.ndarray, labels: np.ndarray, method: str, path: str | Path, max_points: int = 2000,
                   seed: int = 0) -> Path:
    """Scatter of the 2-D ``method`` (pca | tsne) embedding of ``features`` ``[N, F]``, coloured by class."""
    features, labels = _subsample(np.asarray(features, np.float32), np.asarray(labels), max_points, seed)
    points = embed_2d(features, method, seed)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    cmap = "tab10" if labels.max() < 10 else "tab20" if labels.max() < 20 else "hsv"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=6, alpha=0.8, linewidths=0)
    if labels.max() < 20:
        ax.legend(*scatter.legend_elements(num=None), title="class", fontsize=7, loc="best", markerscale=0.8)
    ax.set_title(f"test-split encoder features, {method.upper()} ({len(labels)} points)")
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)


def confusion_matrix_plot(labels: np.ndarray, predictions: np.ndarray, num_classes: int, path: str | Path,
                          title: str) -> Path:
    """Row-normalised confusion matrix (true class per row) of ``predictions`` against ``labels``."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(np.asarray(labels), np.asarray(predictions), labels=list(range(num_classes)),
                              normalize="true")
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xlabel("predicted class"), ax.set_ylabel("true class"), ax.set_title(title)
    if num_classes <= 20:
        ax.set_xticks(range(num_classes)), ax.set_yticks(range(num_classes))
    return _save(fig, path)


LEARNING_CURVES = {
    "loss terms": ("train_loss", "train_kl", "train_nll"),
    "kNN top-1 (validation; test where logged)": None,  # every *_knn_top1_k* metric
    "VarCon temperature and confidence": ("train_tau2_mean", "train_confidence_mean"),
    "learning rate": ("lr",),
    "gradient norm (mean over the epoch's steps)": ("train_grad_norm",),
}


def learning_curves_plot(history: History, path: str | Path) -> Path:
    """One panel per group of ``LEARNING_CURVES``, each metric against its epoch."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), dpi=100)
    for ax in axes.flat[len(LEARNING_CURVES):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, LEARNING_CURVES.items()):
        keys = keys or tuple(sorted(k for k in history if "_knn_top1_k" in k))
        for key in keys:
            if history.get(key):
                steps, values = zip(*sorted(history[key]))
                ax.plot(steps, values, marker="o", markersize=3, label=key)
        ax.set_title(title), ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def temperature_plot(history: History, path: str | Path) -> Path:
    """The schedule actually used: tau1 and tau1 +- eps per epoch, with the batch-mean tau2 it produced."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history.get("tau1"):
        epochs, tau1 = map(np.array, zip(*sorted(history["tau1"])))
        eps = np.array([v for _, v in sorted(history.get("eps", []))] or np.zeros_like(tau1))
        ax.plot(epochs, tau1, marker="o", markersize=3, label="tau1")
        ax.fill_between(epochs, tau1 - eps, tau1 + eps, alpha=0.2, label="tau1 +- eps (tau2 range)")
    if history.get("train_tau2_mean"):
        epochs, tau2 = zip(*sorted(history["train_tau2_mean"]))
        ax.plot(epochs, tau2, linestyle="--", label="mean tau2 (batch)")
    ax.set_xlabel("epoch"), ax.set_ylabel("temperature"), ax.set_title("temperature schedule")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
