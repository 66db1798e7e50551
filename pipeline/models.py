"""Encoders by name, the projection head, and the two trainable wrappers (contrastive, classifier)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig


def small_cnn(width: int) -> tuple[nn.Module, int]:
    """Four conv blocks, each halving the resolution: ``[N, 3, H, W] -> [N, 8*width]``."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    layers = [*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
              *block(2 * width, 4 * width), nn.MaxPool2d(2), *block(4 * width, 8 * width),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 8 * width


def torchvision_resnet(name: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its classifier: ``[N, 3, H, W] -> [N, F]``.

    ``cifar_stem`` replaces the 7x7 stride-2 conv and the max-pool by a 3x3 stride-1 conv (for 32 px inputs).
    """
    net = torchvision.models.get_model(name, weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_encoder(name: str, cifar_stem: bool = True, width: int = 64) -> tuple[nn.Module, int]:
    if name == "small_cnn":
        return small_cnn(width)
    if name.startswith("resnet"):
        return torchvision_resnet(name, cifar_stem)
    raise ValueError(f"unknown encoder {name!r}: use small_cnn or a torchvision resnet name")


class ProjectionHead(nn.Module):
    """``[N, F] -> [N, D]``: Linear -> BatchNorm -> ReLU -> Linear (ours), or Linear -> ReLU -> Linear (the
    references' head, ``batchnorm=False``).

    The BatchNorm spreads the embeddings of a fresh encoder, which are otherwise nearly collinear.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batchnorm: bool = True) -> None:
        super().__init__()
        first = ([nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)] if batchnorm
                 else [nn.Linear(in_dim, hidden_dim)])
        self.net = nn.Sequential(*first, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveModel(nn.Module):
    """``forward(x) -> z``, unit-normalised ``[N, D]``; ``features(x)`` gives the encoder's ``[N, F]``."""

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden_dim: int, embedding_dim: int,
                 head_batchnorm: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(feature_dim, hidden_dim, embedding_dim, head_batchnorm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)), dim=1)


class ClassifierModel(nn.Module):
    """Cross-entropy baseline: ``forward(x) -> logits [N, K]``; ``features(x)`` gives ``[N, F]``."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def build_model(config: ExperimentConfig, num_classes: int) -> nn.Module:
    """The trainable model for an ``ExperimentConfig``."""
    encoder, feature_dim = build_encoder(config.model.encoder, config.model.cifar_stem, config.model.width)
    if config.loss.name == "cross_entropy":
        return ClassifierModel(encoder, feature_dim, num_classes)
    m = config.model
    return ContrastiveModel(encoder, feature_dim, m.head_hidden_dim, m.embedding_dim, m.head_batchnorm)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)
