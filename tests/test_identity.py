"""A run's identity: operational settings never change it, the trajectory always does."""
import dataclasses

import pytest

from pipeline import identity
from pipeline.config import IDENTITY_CLASSES, ExperimentConfig, flatten, load_config, setting


def schema_keys(cls=ExperimentConfig, prefix=""):
    """Every leaf key of the config schema, walked from the dataclasses themselves."""
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) or (kind and dataclasses.is_dataclass(kind)):
            yield from schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_declares_one_identity_class_in_the_schema():
    keys = set(schema_keys())
    assert keys == set(flatten(load_config()))
    assert set(identity.CLASSES) == keys
    unclassified = {key for key, kind in identity.CLASSES.items() if kind not in IDENTITY_CLASSES}
    assert not unclassified, unclassified
    groups = (identity.TRAJECTORY, identity.OPERATIONAL, identity.STORED_DATA_KEYS)
    assert set().union(*groups) == keys and sum(len(g) for g in groups) == len(keys)


def test_a_key_without_an_identity_class_is_refused():
    @dataclasses.dataclass
    class Undecided:
        knob: int = setting(1, "a new key nobody classified")

    assert identity.identity_classes(Undecided) == {"knob": ""}
    with pytest.raises(TypeError, match="is not one of"):
        setting(1, "a key", identity="sometimes")


@pytest.mark.parametrize("change", ["ray.max_failures=5", "ray.resource_wait_s=1", "tracking.outage_wait_s=3",
                                    "data.loader_threads=4", "data.cache_dir=/elsewhere", "eval.every_epochs=5",
                                    "ray.storage_path=/shared/runs", "tracking.tracking_uri=http://head:5000",
                                    "model.compile=true", "data.verify_hash=never", "data.jpeg_quality=50"])
def test_operational_changes_keep_the_run_key(change):
    assert identity.run_key(load_config(None, [change])) == identity.run_key(load_config())


@pytest.mark.parametrize("change", ["loss.tau1=0.2", "optim.lr=0.1", "seed=1", "ray.num_workers=1",
                                    "optim.global_batch_size=64", "data.split_seed=1", "data.write_mode=jpg",
                                    "data.color_jitter_strength=0.2", "model.width=32", "name=other"])
def test_trajectory_changes_give_another_run_key(change):
    assert identity.run_key(load_config(None, [change])) != identity.run_key(load_config())


def test_an_explicit_run_name_is_the_key_and_a_changed_key_is_named():
    config = load_config(None, ["ray.run_name=mine", "loss.tau1=0.2"])
    assert identity.run_key(config) == "mine"
    recorded = flatten(load_config())
    assert identity.changed_keys(recorded, config) == {"ray.run_name": ("", "mine"), "loss.tau1": ("0.1", "0.2")}
