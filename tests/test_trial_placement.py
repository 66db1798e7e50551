"""Where a sweep's trial drivers run: on the session's Ray cluster with one more node, of 0 CPUs, that declares
driver slots (as ``cluster.yaml``'s head does), a Tune trial asking for the resources ``tune.sweep`` gives it runs
its driver on that node, and Ray Train places the trial's controller there too, while the training worker goes to
a node with CPUs: a spot reclaim of a training node cannot take either."""
import json
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import TRIAL_DRIVER_SLOT, ClusterMaximum
from tune.spec import load_sweep
from tune.sweep import trial_resources

pytestmark = pytest.mark.cluster


def alive_controllers() -> dict[str, str]:
    """``{actor id: node id}`` of the Ray Train controllers alive now (earlier tests of the session may leave one)."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
    return {actor.actor_id: actor.node_id for actor in alive}


def where_the_training_runs(config: dict) -> None:
    """A Ray Train worker writes its node and the nodes of the Train controllers started since the trial listed
    ``config["before"]`` (this run's: the cluster tier runs one test at a time) to ``config["found"]``."""
    import ray

    started = [node for actor, node in alive_controllers().items() if actor not in config["before"]]
    Path(config["found"]).write_text(json.dumps({"worker": ray.get_runtime_context().get_node_id(),
                                                 "controllers": started}))


def driver_trial(config: dict) -> None:
    """A Tune trial as ``tune.sweep`` runs one: its process drives a Ray Train run of one worker."""
    import ray
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    found = Path(config["storage"]) / "found.json"
    TorchTrainer(where_the_training_runs, train_loop_config={"found": str(found), "before": list(alive_controllers())},
                 scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="placed", storage_path=config["storage"])).fit()
    tune.report({"driver": ray.get_runtime_context().get_node_id(), **json.loads(found.read_text())})


def test_a_trial_driver_and_its_train_controller_run_on_the_node_that_declares_driver_slots(ray_session, tmp_path):
    import ray
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    path = tmp_path / "cluster.yaml"  # as cluster.yaml: only a node type never preempted hosts trial drivers
    path.write_text(yaml.safe_dump({"max_workers": 1, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0, TRIAL_DRIVER_SLOT: 1}},
        "cpu": {"resources": {"CPU": 1}, "max_workers": 1}}}))
    own, _, _ = trial_resources(load_sweep(None), ClusterMaximum.from_config(path))
    assert own[TRIAL_DRIVER_SLOT] == 1
    slots = ray_session.add_node(num_cpus=0, resources={TRIAL_DRIVER_SLOT: 1})
    try:
        ray_session.wait_for_nodes()
        tuner = tune.Tuner(tune.with_resources(driver_trial, own), param_space={"storage": str(tmp_path / "train")},
                           run_config=tune.RunConfig(name="placement", storage_path=str(tmp_path / "tune"),
                                                     verbose=0))
        (result,) = tuner.fit()
        assert result.error is None, result.error
        placed = result.metrics
        cpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
        assert placed["driver"] == slots.node_id and placed["controllers"] == [slots.node_id]
        assert placed["worker"] in cpu_nodes  # the training itself: on a node with CPUs, not the driver's
    finally:
        ray_session.remove_node(slots)
