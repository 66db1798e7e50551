"""Sharded evaluation with 2 gloo ranks on CPU against the same evaluation in one process.

kNN must give identical predictions (the merge is exact, ties broken by global index); the features probe,
whose minibatches are drawn per shard, agrees within ``PROBE_TOLERANCE``; no rank holds more than its shard.
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.data.augment import ColorAugment
from pipeline.data.prepare import dataset_splits
from pipeline.evaluation import Shard, knn_neighbours, knn_vote
from pipeline.evaluator import Evaluator
from pipeline.models import build_model

WORLD = 2
PROBE_TOLERANCE = 0.03  # top-1 of the features probe: shard-local minibatches change the SGD path, not the optimum
EVAL_OVERRIDES = ["ray.num_workers=2", "eval.linear_probe_epochs=30", "eval.few_shot_episodes=20"]


def spawn(target, *args) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(target, args=(port, *args, results), nprocs=WORLD, join=True)
    return dict(results)


def join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


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


def _knn_rank(rank, port, tied, results):
    join(rank, port)
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
        for index, rank_sims, rank_labels, rank_predicted in spawn(_knn_rank, tied).values():
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


def _evaluator_rank(rank, port, files, results):
    join(rank, port)
    try:
        results[rank] = evaluate(files, WORLD)
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_like_one_process(digits_files):
    single, single_final, _ = evaluate(digits_files, 1)
    split = dataset_splits(load_config().data, digits_files)
    sizes = {"bank": len(split.bank), "val": len(split.val), "test": digits_files.num_test}
    ranks = spawn(_evaluator_rank, digits_files)
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
    assert ranks[0][0] == ranks[1][0]  # every rank reports the same reduced metrics
