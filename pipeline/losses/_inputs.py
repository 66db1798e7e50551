"""Argument checks shared by the losses."""
import torch


def check_inputs(z: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``z`` is ``[B, D]`` and ``labels`` is ``[B]`` of an integer dtype."""
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [B, D] (views stacked along dim 0), got shape {tuple(z.shape)}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per row of z ({z.shape[0]}), got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
