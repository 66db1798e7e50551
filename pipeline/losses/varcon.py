"""VarCon: variational supervised contrastive loss (Wang et al., NeurIPS 2025).

For unit embeddings ``z`` ``[B, D]`` with labels ``y`` ``[B]`` over K possible classes, of which the set R
(size C) is present in the batch:

    w_r      = normalize(sum_{j: y_j = r} z_j)            (detached batch centroids, r in R)        [K, D]
    log p_i  = log_softmax_{r in R}(z_i . w_r / tau1)                                              [B, K]
    c_i      = p(y_i | z_i)                                                                        [B]
    tau2_i   = (tau1 - eps) + 2 eps c_i                    (confidence-adaptive temperature)         [B]
    q_i      = softmax_{r in R}(onehot(y_i)_r / tau2_i)    (variational target)                      [B, K]
    L        = mean_i [ KL(q_i || p_i) - log p(y_i | z_i) ]

The target has two distinct values per row, so it is evaluated in closed form, in log space (``exp(1/tau2)``
would overflow float16 for tau2 < 0.09):

    log q_iy = -log1p((C - 1) exp(-1/tau2_i)),   log q_ir = log q_iy - 1/tau2_i  for r != y_i
    KL_i     = q_iy (log q_iy - log p_iy) + q_ir [(C - 1) log q_ir - (sum_{r in R} log p_ir - log p_iy)]

and ``sum_{r in R} log p_ir = z_i . (sum_r w_r) / tau1 - C logsumexp_i`` needs no ``[B, K]`` pass. Only the
logits and their logsumexp touch ``[B, K]``: cost O(B K D) with a small constant. Classes absent from the batch
get a -inf logit and a zero centroid, so the class set is never built with ``torch.unique`` and the loss makes
no host-device synchronisation. Everything is computed in float32.
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
        batch, dim = z.shape
        num_classes = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        counts = z.new_zeros(num_classes).index_add_(0, labels, z.new_ones(batch))  # [K]
        present = counts > 0
        num_present = present.sum()  # C, kept on the device
        centroids = F.normalize(z.new_zeros(num_classes, dim).index_add_(0, labels, z.detach()), dim=1)  # [K, D]
        absent_bias = torch.zeros_like(counts).masked_fill(~present, float("-inf"))  # [K]

        logits = torch.addmm(absent_bias, z, centroids.T, alpha=1.0 / self.tau1)  # [B, K]
        log_norm = torch.logsumexp(logits, dim=1)  # [B]
        log_p_true = (z * centroids[labels]).sum(1) / self.tau1 - log_norm  # log p(y_i | z_i)
        sum_log_p = z @ centroids.sum(0) / self.tau1 - num_present * log_norm  # sum over r in R of log p_ir

        confidence = log_p_true.exp()
        tau2 = (self.tau1 - self.eps) + 2.0 * self.eps * confidence
        if self.detach_target:
            tau2 = tau2.detach()
        inv_tau2 = 1.0 / tau2
        log_q_true = -torch.log1p((num_present - 1) * torch.exp(-inv_tau2))
        log_q_other = log_q_true - inv_tau2
        q_true, q_other = log_q_true.exp(), log_q_other.exp()
        kl = q_true * (log_q_true - log_p_true) + q_other * (
            (num_present - 1) * log_q_other - (sum_log_p - log_p_true))
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
