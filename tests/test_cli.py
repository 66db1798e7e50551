"""`varcon` sub-commands from the command line's point of view: exit codes, one-line errors, nothing written."""
import re

import pytest
from services import free_port

from pipeline.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train", "tune", "ui"):
        assert command in out


def test_prepare_writes_synthetic_files(varcon_home, capsys):
    args = ["prepare", "data.dataset=synthetic", "data.train_samples=40", "data.test_samples=10"]
    assert main(args) == 0
    assert "(40 samples)" in capsys.readouterr().out
    (beton,) = (varcon_home / ".cache" / "data").glob("synthetic-*/train.beton")
    assert beton.is_file()


@pytest.mark.parametrize("args, fragment", [
    (["prepare", "data.dataset=imagefolder", "data.root=missing"], "is not a folder"),
    (["prepare", "data.dataset=cifar10"], "data.root is empty"),
    (["prepare", "data.dataset=mnist"], "data.dataset='mnist' is unknown"),
    (["prepare", "data.write_mode=webp"], "data.write_mode='webp' is unknown"),
])
def test_bad_data_input_exits_2_with_one_line(varcon_home, capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("varcon: error:")
    assert not (varcon_home / ".cache").exists()


def test_corrupt_beton_is_refused_before_training(varcon_home, capsys):
    args = ["prepare", "data.dataset=synthetic", "data.train_samples=40", "data.test_samples=10"]
    assert main(args) == 0
    (beton,) = (varcon_home / ".cache" / "data").glob("synthetic-*/train.beton")
    beton.write_bytes(beton.read_bytes()[:-64])
    assert main(["train", *args[1:]]) == 2  # refused before Ray or MLflow start
    assert "truncated or altered" in capsys.readouterr().err
    assert not (varcon_home / ".cache" / "mlflow").exists()


def test_prepare_repairs_what_train_refused(varcon_home, capsys):
    args = ["data.dataset=synthetic", "data.train_samples=40", "data.test_samples=10"]
    assert main(["prepare", *args]) == 0
    (beton,) = (varcon_home / ".cache" / "data").glob("synthetic-*/test.beton")
    beton.write_bytes(beton.read_bytes()[:-64])
    assert main(["prepare", *args]) == 0
    assert "rewriting" in capsys.readouterr().out


def test_unreachable_tracking_server_fails_fast_before_any_work(varcon_home, capsys, monkeypatch):

    port = free_port()  # a loopback port nothing listens on
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in err
    assert len(err.strip().splitlines()) == 1 and not (varcon_home / ".cache").exists()


def schema_keys(schema, prefix=""):
    """Every leaf key of a config dataclass, walked here independently of the CLI."""
    import dataclasses

    for f in dataclasses.fields(schema):
        nested = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if nested is not None:
            yield from schema_keys(nested, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def listed_keys(printed: str) -> dict[str, str]:
    """``{key: description}`` from `varcon config --keys` (a key line, then its indented description)."""
    lines = printed.splitlines()
    return {line.split()[0]: lines[i + 1].strip() for i, line in enumerate(lines) if line and line[0] != " "}


def test_config_keys_lists_every_schema_field_with_type_default_and_a_description(capsys):
    from pipeline.config import ExperimentConfig
    from tune.spec import TuneSettings

    assert main(["config", "--keys"]) == 0
    listed = listed_keys(capsys.readouterr().out)
    assert set(listed) == set(schema_keys(ExperimentConfig))
    assert all(text for text in listed.values())
    assert main(["config", "--keys", "--config", "configs/tune/digits_asha.yaml"]) == 0
    printed = capsys.readouterr().out
    listed = listed_keys(printed)
    assert set(listed) == set(schema_keys(ExperimentConfig)) | {f"tune.{k}" for k in schema_keys(TuneSettings)}
    assert re.search(r"^loss\.tau1 +float = 0\.1$", printed, re.M)


def test_config_prints_the_resolved_config_that_train_would_use(tmp_path, capsys):
    from pipeline.config import load_config, to_dict

    args = ["--config", "configs/cifar100_resnet50.yaml", "loss.tau1=0.2", "ray.num_workers=4"]
    assert main(["config", *args]) == 0
    written = tmp_path / "resolved.yaml"
    written.write_text(capsys.readouterr().out)
    assert to_dict(load_config(written)) == to_dict(load_config(args[1], args[2:]))
    assert main(["config", "--config", "configs/tune/digits_asha.yaml", "tune.num_samples=3"]) == 0
    import yaml

    sweep = yaml.safe_load(capsys.readouterr().out)
    assert sweep["tune"]["num_samples"] == 3 and "loss.tau1" in sweep["space"]
    assert sweep["experiment"]["optim"]["epochs"] == 6  # the sweep file's experiment_overrides applied
    assert main(["config", "loss.tau1=0"]) == 2  # bad input: the same one-line error as train


def test_a_batch_the_prepared_data_cannot_fill_is_refused_before_ray_starts(varcon_home, capsys, monkeypatch):
    from pipeline import startup

    data = ["data.dataset=synthetic", "data.train_samples=60", "data.test_samples=20"]
    assert main(["prepare", *data]) == 0

    def no_ray(*_, **__):
        raise AssertionError("Ray was started before the prepared data was checked")

    monkeypatch.setattr(startup, "init_ray", no_ray)
    assert main(["train", *data, "optim.global_batch_size=64"]) == 2  # 60 minus 10 for validation (per class)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "optim.global_batch_size=64 exceeds the 50 training samples of synthetic" in line  # from the manifests
