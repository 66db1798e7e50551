"""A 2-worker training with one worker per node of a 2-node Ray cluster (strict spread): the cross-worker
gather, the global centroids and the checkpoints written to the shared storage path all cross a node boundary.
"""
import ray
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from pipeline.cli import main


def train_workers():
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)


def test_strict_spread_training_across_two_nodes(varcon_home, ray_session):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    before = {w.actor_id for w in train_workers()}
    args = ["train", "optim.epochs=2", "optim.warmup_epochs=0", "ray.placement_strategy=STRICT_SPREAD",
            "name=multinode", "eval.linear_probe_epochs=5", "eval.few_shot_episodes=10"]
    assert main(args) == 0

    run_workers = [w for w in train_workers() if w.actor_id not in before]
    assert len(run_workers) == 2
    assert len({w.node_id for w in run_workers}) == 2, "the two workers ran on different nodes"

    checkpoints = list((varcon_home / ".cache" / "ray_results").glob("multinode-*/checkpoint_*/state.pt"))
    assert checkpoints, "rank 0 wrote checkpoints to the shared storage path"
    client = MlflowClient(f"sqlite:///{varcon_home / '.cache' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
    assert run.data.params["ray.placement_strategy"] == "STRICT_SPREAD"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 2 and losses[1] < losses[0], "training across nodes makes progress"
