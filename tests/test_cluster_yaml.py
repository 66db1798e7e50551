"""cluster.yaml against Ray's own cluster-launcher schema."""
import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import REPO_ROOT


def load_prepared():
    return prepare_config(yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text()))


def test_cluster_yaml_validates_against_ray_schema():
    config = load_prepared()
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "scripts/setup.sh" in commands and "mlflow server" in commands
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands


def test_schema_check_rejects_unknown_fields():
    config = copy.deepcopy(load_prepared())
    config["available_node_types"]["gpu_worker"]["gpus"] = 8  # not a launcher field
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
