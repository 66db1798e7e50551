"""VarCon: variational supervised contrastive loss (Wang et al., NeurIPS 2025).

For unit embeddings ``z`` ``[B, D]`` with labels ``y`` ``[B]`` over K possible classes, of which the set R
(size C) is present in the batch:

    w_r      = normalize(sum_{j: y_j = r} z_j)            (detached batch centroids, r in R)        [K, D]
    log p_i  = log_softmax_{r in R}(z_i . w_r / tau1)                                              [B, K]
    c_i      = p(y_i | z_i)                                                                        [B]
    tau2_i   = (tau1 - eps) + 2 eps c_i                    (confidence-adaptive temperature)         [B]
    log q_i  = log_softmax_{r in R}(onehot(y_i)_r / tau2_i) (variational target, in log space)        [B, K]
    L        = mean_i [ KL(q_i || p_i) - log p(y_i | z_i) ]

Classes absent from the batch are masked out, so the class set is never materialised with ``torch.unique`` and
the loss causes no host-device synchronisation. Everything is computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses._inputs import check_inputs


class VarConLoss(torch.nn.Module):
    """VarCon objective.

    Args:
        tau1: base temperature of the posterior, > 0 (paper: 0.1).
        eps: dispersion range, 0 <= eps < tau1 (paper: 0.02); tau2 lies in [tau1 - eps, tau1 + eps].
        detach_target: stop the gradient through q (via tau2 -> c). The reference keeps it (False).
        num_classes: K, the number of possible labels. ``None`` infers ``labels.max() + 1`` per call, which
            reads a device value: pass it on GPUs.
    """

    def __init__(self, tau1: float = 0.1, eps: float = 0.02, detach_target: bool = False,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if not tau1 > 0:
            raise ValueError(f"tau1={tau1} must be > 0 (the paper uses 0.1)")
        if not eps >= 0:
            raise ValueError(f"eps={eps} must be >= 0 (the paper uses 0.02)")
        if not eps < tau1:
            raise ValueError(f"eps={eps} must be smaller than tau1={tau1} so that tau2 stays positive")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.tau1, self.eps, self.detach_target, self.num_classes = float(tau1), float(eps), detach_target, num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_inputs(z, labels)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._loss(z.float(), labels.long())

    def _loss(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        num_classes = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        classes = torch.arange(num_classes, device=labels.device)
        onehot = (labels[:, None] == classes[None, :]).to(z.dtype)  # [B, K]; no range check, so no host sync
        present = onehot.sum(0) > 0  # [K]
        centroids = F.normalize(onehot.T @ z.detach(), dim=1)  # [K, D]; absent classes are zero rows

        logits = (z @ centroids.T / self.tau1).masked_fill(~present, float("-inf"))  # [B, K]
        log_p = F.log_softmax(logits, dim=1)
        log_p_true = log_p.gather(1, labels[:, None]).squeeze(1)  # [B]
        confidence = log_p_true.exp()
        tau2 = (self.tau1 - self.eps) + 2.0 * self.eps * confidence
        if self.detach_target:
            tau2 = tau2.detach()

        target_logits = (onehot / tau2[:, None]).masked_fill(~present, float("-inf"))
        log_q = F.log_softmax(target_logits, dim=1)  # [B, K]
        # q * (log q - log p) over present classes only: absent entries are -inf - -inf and must not leak NaN.
        log_ratio = torch.where(present, log_q - log_p, torch.zeros_like(log_p))
        kl = (log_q.exp() * log_ratio).sum(1)  # [B]
        nll = -log_p_true
        loss = (kl + nll).mean()
        stats = {
            "kl": kl.mean().detach(),
            "nll": nll.mean().detach(),
            "tau2_mean": tau2.mean().detach(),
            "confidence_mean": confidence.mean().detach(),
        }
        return loss, stats

    def extra_repr(self) -> str:
        return f"tau1={self.tau1}, eps={self.eps}, detach_target={self.detach_target}"
