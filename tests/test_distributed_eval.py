"""Sharded evaluation with 2 gloo ranks on CPU against the same evaluation in one process.

kNN must give identical predictions (the merge is exact, ties broken by global index); the features probe trains
the single-process layer on every rank (to float rounding; through the whole evaluator its top-1 agrees within
``PROBE_TOLERANCE``); the reference probe of 2 ranks x b images per step is that of one process with 2b; no rank
holds more than its shard of what it extracts.
"""
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from services import join_group, spawn_ranks

from pipeline.config import load_config
from pipeline.data.augment import ColorAugment
from pipeline.data.prepare import dataset_splits
from pipeline.evaluation import Shard, knn_neighbours, knn_vote
from pipeline.evaluator import Evaluator
from pipeline.models import build_model
from pipeline.probes import fit_features_probe, fit_reference_probe, linear_probe, reference_probe

WORLD = 2
PROBE_TOLERANCE = 0.03  # top-1 of the features probe through the evaluator (the same layer, to float rounding)
EVAL_OVERRIDES = ["ray.num_workers=2", "eval.linear_probe_epochs=30", "eval.few_shot_episodes=20", "eval.probe=both",
                  "eval.reference_probe_epochs=1", "eval.reference_probe_batch_per_worker=64"]


def features(n: int, seed: int, tied: bool):
    """Unit features ``[n, 8]`` with labels: clustered directions, or (``tied``) one-hot rows, where every
    similarity is exactly 0 or 1 and each query's neighbours are all ties."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=gen)
    if tied:
        return F.one_hot(torch.randint(0, 8, (n,), generator=gen), 8).float(), labels
    centres = F.normalize(torch.randn(5, 8, generator=gen), dim=1)
    return F.normalize(centres[labels] + 0.8 * torch.randn(n, 8, generator=gen), dim=1), labels


def shard_of(feats, labels, rank: int) -> Shard:
    """What ``extract_features`` keeps on ``rank``: every WORLD-th sample from ``rank`` on."""
    index = torch.arange(rank, len(labels), WORLD)
    return Shard(feats[index], torch.ones(len(index)), labels[index], index, len(labels))


def _knn_rank(rank, rendezvous, tied, results):
    join_group(rank, rendezvous, WORLD)
    try:
        bank_feats, bank_labels = features(101, 0, tied)  # odd sizes: the shards differ by one
        query_feats, query_labels = features(37, 1, tied)
        queries = shard_of(query_feats, query_labels, rank)
        sims, labels = knn_neighbours(queries, shard_of(bank_feats, bank_labels, rank), k=9, chunk_size=5)
        results[rank] = (queries.index, sims, labels, knn_vote(sims, labels, 0.1, 5))
    finally:
        dist.destroy_process_group()


def test_sharded_knn_equals_one_process_on_the_same_features():
    for tied in (False, True):
        bank_feats, bank_labels = features(101, 0, tied)
        query_feats, query_labels = features(37, 1, tied)
        sims, labels = knn_neighbours(Shard.whole(query_feats, query_labels), Shard.whole(bank_feats, bank_labels),
                                      k=9, chunk_size=5)
        predicted = knn_vote(sims, labels, 0.1, 5)
        for index, rank_sims, rank_labels, rank_predicted in spawn_ranks(_knn_rank, tied, world=WORLD).values():
            assert torch.equal(rank_labels, labels[index]), f"tied={tied}"  # the same neighbours, in order
            torch.testing.assert_close(rank_sims, sims[index], rtol=0, atol=1e-6)
            assert torch.equal(rank_predicted, predicted[index])


def evaluate(files, rank_world: int):
    config = load_config(None, EVAL_OVERRIDES if rank_world > 1 else EVAL_OVERRIDES[1:])
    torch.manual_seed(0)
    model = build_model(config, files.num_classes)  # the untrained encoder: features all the same
    evaluator = Evaluator(config, files, dataset_splits(config.data, files))
    preprocess = ColorAugment(files.channel_mean, files.channel_std)
    metrics, final = evaluator.final(model, preprocess, torch.device("cpu"))
    shards = evaluator._shards(model, preprocess, torch.device("cpu"), evaluator.loaders)
    return metrics, final, {name: len(shard.index) for name, shard in shards.items()}


def _evaluator_rank(rank, rendezvous, files, results):
    join_group(rank, rendezvous, WORLD)
    try:
        results[rank] = evaluate(files, WORLD)
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_like_one_process(digits_files):
    single, single_final, _ = evaluate(digits_files, 1)
    split = dataset_splits(load_config().data, digits_files)
    sizes = {"bank": len(split.bank), "val": len(split.val), "test": digits_files.num_test}
    ranks = spawn_ranks(_evaluator_rank, digits_files, world=WORLD)
    for rank, (metrics, final, held) in ranks.items():
        # each rank held its own shard only: ceil or floor of a half of each split
        assert held == {name: len(range(rank, n, WORLD)) for name, n in sizes.items()}
        assert torch.equal(final.knn_predictions, single_final.knn_predictions)  # the whole test split, in order
        assert torch.equal(final.labels, single_final.labels)
        for key in ("val_knn_top1_k20", "val_knn_top1_k200", "test_knn_top1_k20", "test_knn_top1_k200"):
            assert metrics[key] == single[key], key
        for key in ("test_dispersion_intra_cos", "test_dispersion_inter_cos"):
            assert abs(metrics[key] - single[key]) < 1e-5, key
        for key in ("test_probe_top1", "val_probe_top1"):
            assert abs(metrics[key] - single[key]) <= PROBE_TOLERANCE, (key, metrics[key], single[key])
        assert abs(metrics["test_fewshot_5way_5shot"] - single["test_fewshot_5way_5shot"]) < 0.01
        # the reference probe: 64 images per worker, lr 5.0 given at 1,024 and scaled to the global batch
        assert (metrics["refprobe_global_batch"], metrics["refprobe_lr"]) == (128.0, 5.0 * 128 / 1024)
        assert 0.0 <= metrics["test_refprobe_top1"] <= 1.0
    # one process (varcon eval) trains the probe the 2-worker run trained: its global batch, at its lr
    assert (single["refprobe_global_batch"], single["refprobe_lr"]) == (128.0, 5.0 * 128 / 1024)
    assert ranks[0][0] == ranks[1][0]  # every rank reports the same reduced metrics


def whole(feats, labels) -> Shard:
    """The whole split as one process holds it (``shard_of``'s layout: raw values, unit norms)."""
    return Shard(feats, torch.ones(len(labels)), labels, torch.arange(len(labels)), len(labels))


def probe_data(n: int = 101, dim: int = 8, seed: int = 3):
    """Raw features ``[n, dim]`` of 5 noisy clusters (norms around 3) and their labels."""
    feats, labels = features(n, seed, tied=False)
    return 3.0 * feats + 0.1 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), labels


REFERENCE_B = 6  # the reference probe's images per rank per step (one process: WORLD x this)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
               "all_to_all_single", "reduce_scatter_tensor")


def reference_batches(feats, labels, per_step: int, part: int = 0, parts: int = 1) -> list:
    """Two-view loader batches ``(view1, view2, labels, index)`` of raw features as ``[b, F, 1, 1]`` images: step
    s holds samples ``[s * per_step, (s + 1) * per_step)``, of which this rank takes the ``part``-th of ``parts``
    equal slices (the last incomplete step dropped, as the training loader does)."""
    images, size = feats[:, :, None, None], per_step // parts
    steps = len(labels) // per_step
    return [(images[s * per_step + part * size:s * per_step + (part + 1) * size], None,
             labels[s * per_step + part * size:s * per_step + (part + 1) * size], None) for s in range(steps)]


@contextmanager
def counted_collectives():
    """Counts the calls of ``torch.distributed``'s collectives inside the block (a list of names)."""
    calls, originals = [], {}
    for name in COLLECTIVES:
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)
            setattr(dist, name, lambda *a, _name=name, **k: (calls.append(_name), originals[_name](*a, **k))[1])
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def both_probes(train: Shard, held: Shard, batches: list) -> dict:
    """Each probe's layer (the features probe's with its standardisation), metrics and collectives, at fixed
    settings."""
    flat, cpu = (lambda x: x.flatten(1)), torch.device("cpu")
    with counted_collectives() as features_calls:
        layer, mean, std = fit_features_probe(train, 5, epochs=4, lr=0.1, batch_size=16, seed=7)
    with counted_collectives() as reference_calls:
        reference = fit_reference_probe(flat, batches, lambda x: x, cpu, None, 8, 5, epochs=6, lr=0.3, seed=5)
    return {"features": (layer.weight.detach(), layer.bias.detach(), mean, std),
            "collectives": (len(features_calls), reference_calls),
            "features_metrics": linear_probe(train, {"test": held}, 5, epochs=4, lr=0.1, batch_size=16, seed=7),
            "reference": (reference.weight.detach(), reference.bias.detach()),
            "reference_metrics": reference_probe(flat, batches, lambda x: x, cpu, None, {"test": train}, 5, epochs=6,
                                                 lr=0.3, seed=5)}


def _probes_rank(rank, rendezvous, results):
    join_group(rank, rendezvous, WORLD)
    try:
        feats, labels = probe_data()
        results[rank] = both_probes(shard_of(feats, labels, rank), shard_of(*features(37, 1, tied=False), rank),
                                    reference_batches(feats, labels, WORLD * REFERENCE_B, rank, WORLD))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def probes():
    """Both probes on the same data in one process and on each of 2 ranks (one spawn for both tests)."""
    feats, labels = probe_data()
    single = both_probes(whole(feats, labels), whole(*features(37, 1, tied=False)),
                         reference_batches(feats, labels, WORLD * REFERENCE_B))
    return single, spawn_ranks(_probes_rank, world=WORLD)


def test_the_sharded_features_probe_trains_the_single_process_layer(probes):
    """Shards of 51 and 50 samples (the padded gather): every rank ends with the layer, standardisation and
    metrics of one process holding the whole split, to float rounding."""
    single, ranks = probes
    for found in ranks.values():
        assert found["collectives"][0] <= 8  # a fixed few to gather the split, none in the 4 x 7 steps
        for name, got, expected in zip(("weight", "bias", "mean", "std"), found["features"], single["features"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        for key, value in single["features_metrics"].items():
            assert abs(found["features_metrics"][key] - value) <= 1 / 37, (key, found["features_metrics"], value)


def test_two_ranks_of_b_images_train_the_reference_probe_of_one_process_with_2b(probes):
    """The same learning rate, the same images per step: 2 ranks x 6 images give the layer of 1 process x 12
    (one all-reduce of the gradient bucket per step), to float rounding, and the same metrics."""
    single, ranks = probes
    steps = 6 * (len(probe_data()[1]) // (WORLD * REFERENCE_B))
    for found in ranks.values():
        assert found["collectives"][1] == ["all_reduce"] * steps  # one gradient all-reduce per step
        for name, got, expected in zip(("weight", "bias"), found["reference"], single["reference"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert found["reference_metrics"] == single["reference_metrics"]
