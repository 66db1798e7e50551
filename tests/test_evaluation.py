"""Evaluation metrics against hand-computed cases and a naive kNN loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation import Shard, dispersion, few_shot_ncm, knn_neighbours, knn_predict
from pipeline.probes import _probe_layer, fit_features_probe, linear_probe, reference_probe, reference_probe_lr


def clustered(n_per_class=30, classes=6, dim=16, noise=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=gen), dim=1)
    return feats, labels


def naive_knn(bank, bank_labels, queries, query_labels, k, t, num_classes):
    correct = 0
    for q, y in zip(queries, query_labels):
        sims = [(float(q @ b), int(lab)) for b, lab in zip(bank, bank_labels)]
        top = sorted(sims, reverse=True)[:k]
        votes = [0.0] * num_classes
        for s, lab in top:
            votes[lab] += math.exp(s / t)
        correct += int(max(range(num_classes), key=votes.__getitem__) == int(y))
    return correct / len(queries)


def test_knn_matches_naive_weighted_vote():
    bank, bank_labels = clustered(noise=0.9, seed=1)
    queries, query_labels = clustered(n_per_class=5, noise=0.9, seed=2)
    for k in (1, 7, 50):
        predicted = knn_predict(bank, bank_labels, queries, k, 0.1, 6, chunk_size=7)
        fast = (predicted == query_labels).float().mean().item()
        assert fast == pytest.approx(naive_knn(bank, bank_labels, queries, query_labels, k, 0.1, 6))


def test_ties_are_broken_by_the_lower_global_index():
    """One-hot features make every similarity exactly 0 or 1: a query's neighbours are all ties, and the k
    chosen must be the k lowest global indices among the equally similar."""
    bank_feats = F.one_hot(torch.tensor([0, 1, 0, 0, 1, 0, 0]), 2).float()
    bank = Shard(bank_feats, torch.ones(7), torch.tensor([5, 4, 3, 2, 1, 0, 6]), torch.arange(7), 7)
    query = Shard.whole(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    sims, labels = knn_neighbours(query, bank, k=3)
    assert sims.tolist() == [[1.0, 1.0, 1.0]] and labels.tolist() == [[5, 3, 2]]  # indices 0, 2, 3
    sims, labels = knn_neighbours(query, bank, k=6)  # then the similarity-0 ones, again by index
    assert labels.tolist() == [[5, 3, 2, 0, 6, 4]]


def test_probe_and_few_shot_solve_separable_data_and_fail_on_noise():
    feats, labels = clustered(noise=0.1)
    data = Shard.whole(feats, labels)
    assert linear_probe(data, {"test": data}, 6, epochs=20)["test_probe_top1"] == 1.0
    assert few_shot_ncm(feats, labels, shots=1, episodes=20) == 1.0
    noise = F.normalize(torch.randn(180, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    assert few_shot_ncm(noise, labels, shots=5, episodes=50) < 0.5  # chance is 0.2


def test_dispersion_of_known_geometry():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    metrics = dispersion(Shard.whole(feats, torch.tensor([0, 0, 1, 1])), num_classes=3)  # class 2 absent
    assert metrics["dispersion_intra_cos"] == pytest.approx(1.0)
    assert metrics["dispersion_inter_cos"] == pytest.approx(0.0)


def test_the_reference_probe_reports_its_final_epoch_and_names_the_test_selected_figure():
    """Frozen 'encoder' = identity on separable raw features: the final epoch is reported per split, and the
    best test epoch only under the name that says it was chosen on the test split."""
    feats, labels = clustered(noise=0.1)
    raw = feats * 3.0
    images = raw[:, :, None, None]  # [n, F, 1, 1]: the "encoder" flattens them back
    batches = [(images[i:i + 30], None, labels[i:i + 30], None) for i in range(0, len(labels), 30)]
    evaluated = {"val": Shard.whole(raw, labels), "test": Shard.whole(raw[::2], labels[::2])}
    metrics = reference_probe(lambda x: x.flatten(1), batches, lambda x: x, torch.device("cpu"), None, evaluated, 6,
                              epochs=5, lr=0.5)
    assert set(metrics) == {"val_refprobe_top1", "test_refprobe_top1", "test_refprobe_top1_best_epoch_test_selected"}
    assert metrics["test_refprobe_top1"] == 1.0
    assert metrics["test_refprobe_top1_best_epoch_test_selected"] >= metrics["test_refprobe_top1"]


def test_the_reference_probe_lr_is_given_at_a_batch_and_scaled_linearly_to_the_global_batch():
    assert reference_probe_lr(5.0, 1024, 8 * 128) == 5.0  # the reference command: 8 GPUs x 128, as given
    assert reference_probe_lr(5.0, 1024, 32 * 128) == 20.0  # the ImageNet-1K config's 32 workers x 128
    assert reference_probe_lr(5.0, 1024, 2 * 64) == 0.625


def test_the_features_probe_step_is_pytorch_sgd_with_momentum_under_the_cosine_schedule():
    """The written-out step (softmax - onehot, momentum 0.9, closed-form cosine) against autograd, ``torch.optim.SGD``
    and ``CosineAnnealingLR`` on the same standardised features, order and initialisation."""
    feats, labels = clustered(noise=0.5)
    train, epochs, batch = Shard.whole(feats, labels), 7, 16  # 180 samples: the last step of each epoch has 4
    layer, mean, std = fit_features_probe(train, 6, epochs=epochs, lr=0.1, batch_size=batch, seed=3)
    x = (train.features - mean) / std
    reference = _probe_layer(16, 6, 3, torch.device("cpu"))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    steps = -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(reference(x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    torch.testing.assert_close(layer.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias, reference.bias, rtol=1e-5, atol=1e-6)
