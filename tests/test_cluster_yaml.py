"""cluster.yaml against Ray's own cluster-launcher schema, and what ``pipeline.cluster`` makes of a cluster."""
import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.cluster import LOCAL_DISK_LABEL, cluster_maximum
from pipeline.config import REPO_ROOT, ConfigError


def load_prepared():
    return prepare_config(yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text()))


def test_cluster_yaml_validates_against_ray_schema():
    config = load_prepared()
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "scripts/node_setup.sh" in commands and "scripts/start_node.sh head" in commands
    assert "scripts/setup.sh" not in commands  # the developer set-up (browser, database server, test extra)
    start = (REPO_ROOT / "scripts" / "start_node.sh").read_text()
    assert "mlflow server" in start and "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


def test_schema_check_rejects_unknown_fields():
    config = copy.deepcopy(load_prepared())
    config["available_node_types"]["gpu_worker"]["gpus"] = 8  # not a launcher field
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def bundled_work():
    """(name, bundles) of every bundled training config and sweep file: what each places on this cluster."""
    from pipeline.cluster import ClusterMaximum, training_bundles
    from pipeline.config import load_config
    from tune.spec import load_sweep
    from tune.study_spec import ARMS, PAPER, SEARCHED, load_study
    from tune.sweep import trial_bundles

    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        r = load_config(path).ray
        yield path.name, training_bundles(r.num_workers, r.cpus_per_worker, r.use_gpu)
    maximum = ClusterMaximum.from_config(REPO_ROOT / "cluster.yaml")  # trial drivers take its driver slots
    for path in sorted((REPO_ROOT / "configs" / "tune").glob("*.yaml")):
        yield f"tune/{path.name}", trial_bundles(load_sweep(path), maximum)
    for path in sorted((REPO_ROOT / "configs" / "study").glob("*.yaml")):  # a study's trials: its sweeps' trials
        study = load_study(path)
        for arm in SEARCHED:
            yield f"study/{path.name}:{arm}", trial_bundles(study.search(arm), maximum)
        yield f"study/{path.name}:retraining", trial_bundles(study.retraining({a: PAPER for a in ARMS}), maximum)


def test_cluster_yaml_can_grow_to_hold_every_bundled_config():
    from pipeline.cluster import ClusterMaximum

    maximum = ClusterMaximum.from_config(REPO_ROOT / "cluster.yaml")
    work = dict(bundled_work())
    assert max(sum(b.get("GPU", 0) for b in bundles) for bundles in work.values()) == 32  # imagenet1k
    for name, bundles in work.items():
        assert maximum.problem(bundles) is None, name
    cifar_study = work["study/cifar100_resnet50.yaml:population"]  # a PBT trial of the CIFAR-100 study: 4 GPUs
    assert sum(b.get("GPU", 0) for b in cifar_study) == 4 and maximum.problem(cifar_study * 8) is None  # all 8 live
    assert maximum.most("GPU") == 32 and maximum.problem([{"CPU": 10, "GPU": 1}] * 33) is not None
    types = load_prepared()["available_node_types"]
    assert all("resources" in t and (t["resources"] or name == "head") for name, t in types.items())
    assert types["head"]["resources"]["CPU"] == 0  # no training or preparation on the head
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for t in types.values())  # CPU jobs


def test_the_gpu_type_declares_its_local_disk_in_a_label_ray_accepts():
    """data.stage's disk is a node label (cluster.yaml's ``labels``, which Ray's launcher gives ``ray start``):
    the GPU type declares its NVMe; a training worker, GPU or CPU, may land only there among declaring types."""
    from ray._private.label_utils import validate_node_labels

    validate_node_labels(load_prepared()["available_node_types"]["gpu_worker"]["labels"])
    maximum = cluster_maximum(str(REPO_ROOT / "cluster.yaml"))
    assert maximum.local_disks({"CPU": 10, "GPU": 1}) == {"gpu_worker": 7800.0}
    assert maximum.local_disks({"CPU": 10}) == {"gpu_worker": 7800.0}  # cpu_worker declares none
    assert maximum.local_disks({"CPU": 200}) == {}


def test_a_disk_label_that_is_no_number_is_one_line(tmp_path):
    text = (REPO_ROOT / "cluster.yaml").read_text()
    broken = text.replace(f'{LOCAL_DISK_LABEL}: "7800"', f'{LOCAL_DISK_LABEL}: "8TB"')
    assert broken != text
    (tmp_path / "cluster.yaml").write_text(broken)
    with pytest.raises(ConfigError, match="node type gpu_worker of .*: label varcon.io/local-disk-gb='8TB' must be"):
        cluster_maximum(str(tmp_path / "cluster.yaml"))


def test_the_maximum_counts_the_largest_nodes_within_max_workers():
    from pipeline.cluster import ClusterMaximum, NodeType

    maximum = ClusterMaximum((NodeType("head", {"CPU": 0}, 1, True), NodeType("small", {"CPU": 4}, 10),
                              NodeType("big", {"CPU": 16, "GPU": 2}, 2)), 3, "test.yaml")
    assert maximum.most("CPU") == 16 + 16 + 4  # both big nodes, then one small one: 3 workers at most
    assert maximum.most("GPU") == 4
    assert maximum.problem([{"CPU": 17}]) == "no node type of test.yaml holds a bundle of 17 CPU, 0 GPU"
    assert "needs 37 CPU" in maximum.problem([{"CPU": 1}] * 37) and maximum.problem([{"CPU": 1}] * 36) is None


def test_the_wait_for_the_autoscaler_says_what_is_needed_had_and_added():
    from pipeline.cluster import waiting_line

    line = waiting_line([{"CPU": 10.0, "GPU": 1.0}] * 32, before={"CPU": 8.0, "memory": 1e9},
                        have={"CPU": 200.0, "GPU": 16.0, "memory": 3e11, "node:10.0.0.1": 1.0},
                        waited_s=7.4 * 60, wait_s=1800)
    assert line == ("waiting for the autoscaler: the run needs 320 CPU, 32 GPU; the cluster has 200 CPU, 16 GPU "
                    "(192 CPU, 16 GPU added since asked); 7 of 30 min (ray.resource_wait_s)")


def uncommented(first_keys: str) -> dict:
    """cluster.yaml with the commented block that starts at a line ``# <one of first_keys>`` uncommented, up to the
    next blank line or uncommented line, as its comment tells a user to: validated, after Ray's own preparation."""
    import re

    out, inside = [], False
    for line in (REPO_ROOT / "cluster.yaml").read_text().splitlines():
        if re.match(rf"^\s*# ({first_keys})", line):
            inside = True
        if inside and not line.lstrip().startswith("#"):
            inside = False
        out.append(re.sub(r"^(\s*)# ", r"\1", line) if inside else line)
    config = prepare_config(yaml.safe_load("\n".join(out)))
    validate_config(config)
    return config


def test_the_commented_spot_gpu_type_with_its_watcher_is_valid_once_uncommented():
    """cluster.yaml offers the GPU type on spot, commented: uncommented as its comment says, it is still a valid
    launcher file and the spot nodes start the preemption watcher."""
    config = uncommented("InstanceMarketOptions|  MarketType|worker_setup_commands")
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "python -m pipeline.spot_watcher --address=$RAY_HEAD_IP:6379" in " ".join(gpu["worker_setup_commands"])


def test_sweep_trial_drivers_land_only_on_node_types_never_preempted():
    """Every Ray Train trial's driver of the bundled sweeps takes a varcon_trial_driver, which only on-demand node
    types declare: with the GPU type on spot, a reclaim never takes a driver (nor its Train controller)."""
    from pipeline.cluster import TRIAL_DRIVER_SLOT, ClusterMaximum
    from tune.spec import load_sweep
    from tune.sweep import trial_bundles

    config = uncommented("InstanceMarketOptions|  MarketType|worker_setup_commands")
    spot = {name for name, t in config["available_node_types"].items() if "InstanceMarketOptions" in t["node_config"]}
    maximum = ClusterMaximum.from_config(REPO_ROOT / "cluster.yaml")
    assert spot == {"gpu_worker"} and {t.name for t in maximum.node_types if t.resources.get(TRIAL_DRIVER_SLOT)} == {
        "head", "cpu_worker"}
    sweeps = [load_sweep(path) for path in sorted((REPO_ROOT / "configs" / "tune").glob("*.yaml"))]
    trained_by_ray_train = [spec for spec in sweeps if not spec.population_based]
    assert len(trained_by_ray_train) >= 3
    for spec in trained_by_ray_train:
        driver = trial_bundles(spec, maximum)[0]
        assert driver[TRIAL_DRIVER_SLOT] == 1
        assert {t.name for t in maximum.node_types if t.holds(driver)} == {"head", "cpu_worker"}, spec.settings.name


def test_the_commented_efa_set_up_gives_every_network_card_an_efa_in_one_placement_group():
    """The EFA set-up of the GPU type, uncommented: valid, one EFA per network card of a p4d (4), in a cluster
    placement group, and Ray's AWS bootstrap takes the subnets and security groups from the interfaces (it refuses
    them at both levels)."""
    from ray.autoscaler._private.aws.config import _configure_node_type_from_network_interface

    gpu = uncommented("Placement|NetworkInterfaces")["available_node_types"]["gpu_worker"]
    interfaces = gpu["node_config"]["NetworkInterfaces"]
    assert [(i["NetworkCardIndex"], i["InterfaceType"]) for i in interfaces] == [(card, "efa") for card in range(4)]
    assert gpu["node_config"]["Placement"] == {"GroupName": "varcon-p4d"}
    assert "InstanceMarketOptions" not in gpu["node_config"]  # the spot block stays as it is
    bootstrapped = _configure_node_type_from_network_interface(gpu)["node_config"]
    assert bootstrapped["SubnetIds"] == ["subnet-00000000"] * 4 and set(bootstrapped["SecurityGroupIds"]) == {
        "sg-00000000"}


def test_every_start_command_closes_the_doors():
    """Ray's token authentication on every ``ray start``, the token and the tracking credentials copied to where Ray's
    and MLflow's own clients read them on every node, MLflow behind its basic-auth app, and node scripts that stop
    only what they started (a pid file and its session; no ``ray stop``, no pkill by name)."""
    from pathlib import Path

    from mlflow.utils.credentials import _get_credentials_path
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    config = load_prepared()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert starts == ["bash ~/varcon/scripts/start_node.sh head", "bash ~/varcon/scripts/start_node.sh worker"]
    scripts = REPO_ROOT / "scripts"
    start = (scripts / "start_node.sh").read_text()
    ray_starts = [line for line in start.splitlines() if line.lstrip().startswith("ray start")]
    assert len(ray_starts) == 2 and "export PATH" in start and "RAY_AUTH_MODE=token" in start
    home = Path.home()
    mounts = {str(home / Path(remote).expanduser().relative_to(home)) for remote in config["file_mounts"]
              if remote.startswith("~")}
    assert {str(_get_default_token_path()), _get_credentials_path()} <= mounts
    assert "--app-name basic-auth" in start and "MLFLOW_AUTH_CONFIG_PATH=" in start
    assert 'MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat ~/.varcon/mlflow_secret_key)"' in start
    node_scripts = [(scripts / name).read_text() for name in ("start_node.sh", "node_env.sh", "node_setup.sh",
                                                              "node_mounts.sh")]
    assert not any("pkill -f" in text or "ray stop" in text.replace("`ray stop`", "")
                   for text in node_scripts + config["setup_commands"])


@pytest.mark.parametrize("script", ["start_node.sh head", "start_node.sh worker", "node_mounts.sh"])
def test_a_node_without_its_cluster_env_is_one_line_naming_the_fix(tmp_path, script):
    """The node commands read the cluster's values from ~/.varcon/cluster.env: without it, one line, exit 2, and
    nothing started or written on the node."""
    import subprocess

    name, *args = script.split()
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / name), *args], env={"HOME": str(tmp_path),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cluster.env is missing" in line and "cluster.env.example" in line, line
    assert list(tmp_path.iterdir()) == []
