"""`varcon` sub-commands from the command line's point of view: exit codes, one-line errors, nothing written."""
import pytest

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
    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in err
    assert len(err.strip().splitlines()) == 1 and not (varcon_home / ".cache").exists()
