import dataclasses

import pytest

from pipeline.config import (
    DEFAULT_CONFIG,
    ConfigError,
    build_config,
    flatten,
    from_dict,
    load_config,
    stored_config,
    to_dict,
)


def test_default_config_is_the_digits_demo():
    config = load_config()
    assert config.data.dataset == "digits"
    assert config.loss.name == "varcon" and config.ray.num_workers == 2


def test_dotted_overrides_are_typed():
    config = load_config(DEFAULT_CONFIG, ["loss.tau1=0.07", "optim.epochs=3", "data.horizontal_flip=true",
                                          "eval.knn_k=[5, 10]"])
    assert config.loss.tau1 == 0.07 and config.optim.epochs == 3
    assert config.data.horizontal_flip is True and config.eval.knn_k == [5, 10]


def test_round_trip_through_dict():
    config = load_config(None, ["loss.eps=0.01"])
    assert from_dict(to_dict(config)) == config


def test_flatten_gives_dotted_string_params():
    flat = flatten(load_config())
    assert flat["loss.tau1"] == "0.1" and flat["ray.num_workers"] == "2"
    assert all(isinstance(v, str) for v in flat.values())


@pytest.mark.parametrize("overrides, fragment", [
    (["loss.tua1=0.1"], "did you mean loss.tau1"),
    (["optim.epochs=abc"], "optim.epochs must be of type int"),
    (["loss.tau1=0"], "loss.tau1=0.0 must be > 0"),
    (["loss.eps=0.2"], "must be smaller than loss.tau1"),
    (["optim.global_batch_size=127"], "multiple of ray.num_workers"),
    (["optim.epochs=0"], "optim.epochs=0 must be >= 1"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (["model.encoder=vgg"], "model.encoder='vgg' is unknown"),
    (["no_equals_sign"], "must look like section.key=value"),
    (["name=my run's/1"], "may hold only letters, digits"),
    (["eval.final_split=val", "data.val_fraction=0"], "eval.final_split=val reads no test split: it needs"),
    (["eval.final_split=val", "eval.test_every_epochs=1"], "eval.final_split=val reads no test split: it needs"),
    (["eval.final_split=train"], "eval.final_split='train' must be test or val"),
    (["ray.checkpoint_at_epochs=[0]"], "ray.checkpoint_at_epochs=[0] must list epochs between 1 and"),
])
def test_bad_values_name_the_fix(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((DEFAULT_CONFIG.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_parses_validates_and_builds(path):
    from pipeline.models import ContrastiveModel, build_model

    config = load_config(path)
    assert config.optim.global_batch_size % config.ray.num_workers == 0
    model = build_model(config, num_classes=100)
    if isinstance(model, ContrastiveModel):
        assert model.head.net[-1].out_features == config.model.embedding_dim
        assert model.head.net[0].out_features == config.model.head_hidden_dim


def test_recipe_values_and_base_inheritance():
    recipe = load_config(DEFAULT_CONFIG.parent / "cifar100_resnet50.yaml")
    supcon = load_config(DEFAULT_CONFIG.parent / "cifar100_resnet50_supcon.yaml")
    assert (recipe.optim.global_batch_size, recipe.optim.epochs, recipe.optim.warmup_epochs) == (1024, 200, 10)
    assert (recipe.loss.tau1, recipe.loss.eps, recipe.model.head_hidden_dim) == (0.1, 0.02, 2048)
    assert supcon.loss.name == "supcon" and supcon.data == recipe.data and supcon.model == recipe.model
    # SupCon keeps its own reference's optimiser values (tests/test_recipes.py), the rest is inherited
    own = {"lr": supcon.optim.lr, "weight_decay": supcon.optim.weight_decay,
           "warmup_start_lr": supcon.optim.warmup_start_lr}
    assert supcon.optim == dataclasses.replace(recipe.optim, **own) and own != {
        "lr": recipe.optim.lr, "weight_decay": recipe.optim.weight_decay,
        "warmup_start_lr": recipe.optim.warmup_start_lr}


def test_base_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="names itself as a base"):
        load_config(tmp_path / "a.yaml")


def test_a_checkpoint_config_with_a_replaced_key_is_translated_but_a_users_is_refused():
    """A checkpoint written before eval.reference_probe_batch_size (global) was replaced still evaluates with
    the probe it had: the same global batch split over its workers, the lr given at that batch."""
    raw = to_dict(load_config())
    for key in ("reference_probe_batch_per_worker", "reference_probe_lr_batch"):
        del raw["eval"][key]
    raw["eval"]["reference_probe_batch_size"] = 256
    raw["ray"]["num_workers"] = 2
    config = stored_config(raw)
    assert (config.eval.reference_probe_batch_per_worker, config.eval.reference_probe_lr_batch) == (128, 256)
    assert stored_config(raw, ["eval.reference_probe_epochs=3"]).eval.reference_probe_epochs == 3
    with pytest.raises(ConfigError, match="eval.reference_probe_batch_size was replaced"):
        build_config(raw)
