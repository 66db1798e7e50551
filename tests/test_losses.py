"""The objectives against naive float64 per-sample loops written independently of the implementation."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.losses import SupConLoss, VarConLoss


def naive_varcon(z: torch.Tensor, labels: list[int], tau1: float, eps: float) -> torch.Tensor:
    """VARCON.md step by step, one sample at a time, float64, with the class set listed explicitly."""
    classes = sorted(set(labels))
    centroids = {}
    for r in classes:
        members = [z[j].detach() for j in range(len(labels)) if labels[j] == r]
        mean = sum(members) / len(members)
        centroids[r] = mean / mean.norm()
    total = 0.0
    for i, y in enumerate(labels):
        logits = torch.stack([z[i] @ centroids[r] / tau1 for r in classes])
        log_p = logits - torch.logsumexp(logits, 0)
        yi = classes.index(y)
        confidence = log_p[yi].exp()
        tau2 = (tau1 - eps) + 2 * eps * confidence
        target_logits = torch.stack([(1.0 if r == y else 0.0) / tau2 for r in classes])
        log_q = target_logits - torch.logsumexp(target_logits, 0)
        kl = sum(log_q[k].exp() * (log_q[k] - log_p[k]) for k in range(len(classes)))
        total = total + kl - log_p[yi]
    return total / len(labels)


def naive_supcon(z: torch.Tensor, labels: list[int], tau: float, base_tau: float) -> torch.Tensor:
    n, per_anchor = len(labels), []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in range(n) if a != i)
        terms = [torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives]
        per_anchor.append(-(tau / base_tau) * sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor)


def random_batch(n: int, d: int, num_classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return z, labels


@pytest.mark.parametrize("tau1, eps, seed", [(0.1, 0.02, 0), (0.5, 0.0, 1), (0.03, 0.029, 2), (1.0, 0.3, 3)])
def test_varcon_value_and_gradient_match_naive_loop(tau1, eps, seed):
    z, labels = random_batch(24, 8, 5, seed)
    z_fast = z.float().clone().requires_grad_()
    loss, stats = VarConLoss(tau1, eps, num_classes=7)(z_fast, labels)  # classes 5 and 6 absent
    loss.backward()
    z_slow = z.clone().requires_grad_()
    expected = naive_varcon(z_slow, labels.tolist(), tau1, eps)
    expected.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(z_fast.grad.double(), z_slow.grad, rtol=1e-3, atol=1e-5)
    assert stats["kl"].item() + stats["nll"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert tau1 - eps - 1e-6 <= stats["tau2_mean"].item() <= tau1 + eps + 1e-6


def test_varcon_equals_cross_entropy_form():
    """L = mean_i [2 CE(t_i, p_i) - H(q_i)] with t = (onehot + q) / 2 (VARCON.md, step 5)."""
    z, labels = random_batch(32, 16, 4, 7)
    tau1, eps = 0.1, 0.02
    loss, _ = VarConLoss(tau1, eps)(z.float(), labels)
    classes = labels.unique()
    onehot = (labels[:, None] == classes[None]).double()
    centroids = F.normalize(onehot.T @ z, dim=1)
    log_p = F.log_softmax(z @ centroids.T / tau1, 1)
    tau2 = (tau1 - eps) + 2 * eps * (log_p * onehot).sum(1).exp()
    log_q = F.log_softmax(onehot / tau2[:, None], 1)
    t = (onehot + log_q.exp()) / 2
    expected = (2 * -(t * log_p).sum(1) + (log_q.exp() * log_q).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_varcon_single_class_is_zero_and_finite_everywhere():
    z, _ = random_batch(8, 4, 1, 0)
    loss, _ = VarConLoss()(z.float(), torch.zeros(8, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    for tau1 in (0.01, 0.1, 1.0):
        for eps in (0.0, tau1 / 2, tau1 * 0.999):
            z, labels = random_batch(16, 8, 16, 3)  # mostly singleton classes
            z = z.float().requires_grad_()
            loss, _ = VarConLoss(tau1, eps, num_classes=16)(z, labels)
            loss.backward()
            assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varcon_computes_in_float32_for_low_precision_inputs(dtype):
    z, labels = random_batch(32, 16, 4, 5)
    reference, _ = VarConLoss(0.05, 0.04)(z.to(dtype).float(), labels)
    loss, _ = VarConLoss(0.05, 0.04)(z.to(dtype), labels)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"tau1": 0.0}, "tau1=0.0 must be > 0"), ({"eps": -0.1}, "eps=-0.1 must be >= 0"),
    ({"tau1": 0.1, "eps": 0.1}, "must be smaller than tau1"),
])
def test_varcon_argument_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        VarConLoss(**kwargs)


def test_loss_input_validation():
    with pytest.raises(ValueError, match="z must be 2-D"):
        VarConLoss()(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per row"):
        SupConLoss()(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):
        SupConLoss(temperature=0)


def test_supcon_matches_naive_loop_with_temperature_scale():
    z, labels = random_batch(20, 8, 4, 11)
    z_fast = z.float().clone().requires_grad_()
    loss, _ = SupConLoss(0.1, 0.07)(z_fast, labels)
    loss.backward()
    z_slow = z.clone().requires_grad_()
    expected = naive_supcon(z_slow, labels.tolist(), 0.1, 0.07)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    torch.testing.assert_close(z_fast.grad.double(), z_slow.grad, rtol=1e-3, atol=1e-5)


def test_varcon_all_classes_present_and_absent_classes_do_not_matter():
    z, labels = random_batch(30, 8, 10, 4)
    labels[:10] = torch.arange(10)  # all ten classes present
    tight, _ = VarConLoss(num_classes=10)(z.float(), labels)
    padded, _ = VarConLoss(num_classes=50)(z.float(), labels)  # 40 absent classes masked out
    expected = naive_varcon(z, labels.tolist(), 0.1, 0.02)
    assert tight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert padded.item() == pytest.approx(tight.item(), rel=1e-6)


def test_detach_target_keeps_the_value_and_changes_the_gradient():
    z, labels = random_batch(24, 8, 3, 9)
    grads, values = [], []
    for detach in (False, True):
        zz = z.float().clone().requires_grad_()
        loss, _ = VarConLoss(0.1, 0.05, detach_target=detach)(zz, labels)
        loss.backward()
        grads.append(zz.grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1], rel=1e-7)
    assert not torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_losses_stay_float32_under_autocast():
    z, labels = random_batch(16, 8, 3, 2)
    reference, _ = VarConLoss()(z.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = VarConLoss()(z.float(), labels)
        sup, _ = SupConLoss()(z.float(), labels)
    assert loss.dtype == sup.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


# Operators that make the host wait for the device: reading a value, or an output whose shape depends on data.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "masked_select", "is_nonzero", "equal"}


class HostSyncRecorder(TorchDispatchMode):
    """Records every dispatched operator that would synchronise host and device on a GPU."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss_fn", [VarConLoss(num_classes=6), SupConLoss()], ids=["varcon", "supcon"])
def test_losses_do_no_host_device_sync(loss_fn):
    z, labels = random_batch(16, 8, 6, 1)
    z = z.float().requires_grad_()
    with HostSyncRecorder() as recorder:
        loss, stats = loss_fn(z, labels)
        loss.backward()
    assert recorder.seen == []


def test_the_sync_check_catches_an_inferred_class_count():
    z, labels = random_batch(16, 8, 6, 1)
    with HostSyncRecorder() as recorder:
        VarConLoss()(z.float(), labels)  # num_classes=None reads labels.max() on the host
    assert "_local_scalar_dense" in recorder.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    z, labels = random_batch(64, 16, 10, 0)
    z, labels = z.float().cuda().requires_grad_(), labels.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss_fn in (VarConLoss(num_classes=10), SupConLoss()):
            loss, _ = loss_fn(z, labels)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cross_entropy_baseline_matches_torch():
    from pipeline.losses import CrossEntropyLoss

    logits, labels = torch.randn(12, 5), torch.randint(0, 5, (12,))
    loss, stats = CrossEntropyLoss()(logits, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert stats["train_top1"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
