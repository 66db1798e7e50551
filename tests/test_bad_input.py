"""Bad input through the CLI: exit code 2, one line naming the fix, no traceback, nothing half-written.

The README's "Bad input" list is this table (plus test_cli.py's data cases and the sweep-file cases of
test_tune_spec.py).
"""
import os

import numpy as np
import pytest
from PIL import Image
from services import free_port
from test_study import impossible_periodic, study_file

from pipeline.cli import main


def imagefolder(root, bad_image=False, empty=False, lonely=False):
    """Classes a and b with 3 images per split (``lonely``: class b has one training image)."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            if empty:
                continue
            for i in range(1 if lonely and split == "train" and label == "b" else 3):
                Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    if bad_image:
        (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def corrupt_beton(home):
    synthetic = ["data.dataset=synthetic", "data.train_samples=40", "data.test_samples=10"]
    assert main(["prepare", *synthetic]) == 0
    (beton,) = (home / ".cache" / "data").glob("synthetic-*/train.beton")
    data = bytearray(beton.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, altered content
    beton.write_bytes(bytes(data))
    return ["train", *synthetic, "data.verify_hash=always"]


def small_disk_cluster(home):
    """Prepared digits files staged (data.stage=local) on a cluster whose worker type declares a 1 kB disk."""
    assert main(["prepare"]) == 0
    config = home / "small-disk-cluster.yaml"
    config.write_text("max_workers: 2\nhead_node_type: head\navailable_node_types:\n"
                      "  head: {resources: {CPU: 0}, node_config: {}, max_workers: 0}\n"
                      "  small_disk: {resources: {CPU: 4}, labels: {varcon.io/local-disk-gb: '0.000001'}, "
                      "node_config: {}, max_workers: 2}\n")
    return ["train", "data.stage=local", f"data.stage_dir={home / 'stage'}", f"ray.autoscaler_config={config}"]


def malformed_yaml(home):
    path = home / "broken.yaml"
    path.write_text("loss:\n  tau1: 0.1\n   eps: [0.02\n")
    return ["train", "--config", str(path)]


def impossible_periodic_study(home):
    """The CI study, its schedule space allowing eps 0.04 with tau1 0.05 (each bound alone is fine)."""
    return ["study", "--config", study_file(home, impossible_periodic)]


CASES = {
    # config keys and types
    "unknown key": (["train", "loss.temperature=0.1"], "unknown config key loss.temperature"),
    "misspelled key": (["train", "optim.weight_decy=0.1"], "did you mean optim.weight_decay"),
    "misspelled section": (["train", "optm.lr=0.1"], "did you mean optim"),
    "wrong type": (["train", "optim.epochs=ten"], "optim.epochs must be of type int"),
    "override without =": (["train", "optim.epochs"], "must look like section.key=value"),
    # out-of-range values
    "tau1 <= 0": (["train", "loss.tau1=0"], "loss.tau1=0.0 must be > 0"),
    "eps >= tau1": (["train", "loss.eps=0.1"], "loss.eps=0.1 must be smaller than loss.tau1=0.1"),
    "negative eps": (["train", "loss.eps=-0.01"], "loss.eps=-0.01 must be >= 0"),
    "negative learning rate": (["train", "optim.lr=-0.5"], "optim.lr=-0.5 must be > 0"),
    "zero epochs": (["train", "optim.epochs=0"], "optim.epochs=0 must be >= 1"),
    "schedule reaching eps >= tau1": (["train", "loss.schedule.kind=linear", "loss.schedule.tau1_end=0.01"],
                                      "reaches tau1=0.01, eps=0.02"),
    "periodic schedule below the least gap": (["train", "loss.schedule.kind=periodic", "loss.schedule.period=10",
                                               "loss.schedule.tau1_half_period=0.02"],
                                              "tau1 - eps must stay >= 0.02"),
    "negative preemption retries": (["train", "ray.max_preemption_failures=-2"],
                                    "ray.max_preemption_failures must be >= 0, or -1 for unlimited"),
    "batch not divisible by workers": (["train", "optim.global_batch_size=129"],
                                       "must be a positive multiple of ray.num_workers=2"),
    # unknown names
    "unknown dataset": (["train", "data.dataset=mnist"], "data.dataset='mnist' is unknown"),
    "unknown model": (["train", "model.encoder=vit_b16"], "model.encoder='vit_b16' is unknown"),
    "unknown loss": (["train", "loss.name=triplet"], "loss.name='triplet' is unknown"),
    "unknown temperature schedule": (["train", "loss.schedule.kind=exponential"], "kind='exponential' is unknown"),
    "unknown tune scheduler": (["tune", "tune.scheduler=hyperband"], "tune.scheduler='hyperband' is unknown"),
    "unknown tune searcher": (["tune", "tune.searcher=bohb"], "tune.searcher='bohb' is unknown"),
    # files and data
    "missing config file": (["train", "--config", "no/such.yaml"], "does not exist"),
    "malformed YAML": (malformed_yaml, "is not valid YAML"),
    "missing data folder": (["train", "data.dataset=imagefolder", "data.root=/no/such/folder"],
                            "data.root=/no/such/folder is not visible here and no prepared files record it"),
    "empty data folder": (lambda home: ["train", "data.dataset=imagefolder",
                                        f"data.root={imagefolder(home / 'empty', empty=True)}"], "holds no images"),
    "unreadable image": (lambda home: ["train", "data.dataset=imagefolder", "data.image_size=12",
                                       f"data.root={imagefolder(home / 'bad', bad_image=True)}"], "unreadable image"),
    "corrupt .beton": (corrupt_beton, "altered after writing"),
    # splits and evaluation
    "validation share above 0.5": (["train", "data.val_fraction=0.6"], "data.val_fraction=0.6 must lie in [0, 0.5]"),
    "negative validation share": (["train", "data.val_fraction=-0.1"], "must lie in [0, 0.5]"),
    "validation leaving a class no training image": (
        lambda home: ["train", "data.dataset=imagefolder", "data.image_size=12",
                      f"data.root={imagefolder(home / 'lonely', lonely=True)}"],
        "leaves class 'b' (1 training sample) none to train on"),
    "the same from the source (torchvision loader)": (
        lambda home: ["train", "data.dataset=imagefolder", "data.image_size=12", "data.loader=torchvision",
                      f"data.root={imagefolder(home / 'lonely', lonely=True)}"],
        "leaves class 'b' (1 training sample) none to train on"),
    "sweep without validation": (["tune", "data.val_fraction=0"], "data.val_fraction=0 leaves none"),
    "study without validation": (["study", "data.val_fraction=0"], "a study selects on the validation split, and "
                                                                   "data.val_fraction=0 leaves none"),
    "study baseline that is no arm": (["study", "study.baselines=[paper, sgd]"],
                                      "study.baselines=['paper', 'sgd'] must name arms"),
    "study verdicts over 2 seeds": (["study", "study.seeds=2"], "a verdict needs at least 3 seeds"),
    "study with an impossible periodic schedule": (impossible_periodic_study, "tau1 - eps must stay >= 0.02"),
    "unknown probe": (["train", "eval.probe=knn"], "eval.probe='knn' must be one of features, reference, both"),
    "reference probe batch per worker below 1": (
        ["train", "eval.probe=reference", "eval.reference_probe_batch_per_worker=0"],
        "eval.reference_probe_batch_per_worker=0 must be >= 1"),
    "reference probe batch of the removed key": (["train", "eval.reference_probe_batch_size=256"],
                                                 "was replaced: set eval.reference_probe_batch_per_worker"),
    "reference probe batch above the training samples": (
        ["train", "eval.probe=both", "eval.reference_probe_batch_per_worker=2048"],
        "eval.reference_probe_batch_per_worker=2048 x ray.num_workers=2 = 4096 exceeds the 1207 training samples"),
    "monitor epoch beyond training": (["train", "eval.at_epochs=[3, 16]"], "eval.at_epochs=[3, 16] must list epochs"),
    "unreachable tracking server": (lambda home: ["train", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"],
                                    "does not answer"),
    "unreachable tracking database": (
        lambda home: ["train", f"tracking.tracking_uri=postgresql://varcon:secret@127.0.0.1:{free_port()}/mlflow"],
        "the tracking database postgresql://***@127.0.0.1:"),
    "tracking URI no MLflow store uses": (["train", "tracking.tracking_uri=ftp://host/mlflow"],
                                          "has scheme ftp://, which no MLflow store uses"),
    # evaluation of what is not a checkpoint: the error names what was given
    "eval of a folder without a checkpoint": (lambda home: ["eval", "--checkpoint", str(folder_with(home, "empty"))],
                                              "/empty holds no state.pt: pass a checkpoint folder"),
    "eval of a damaged checkpoint": (
        lambda home: ["eval", "--checkpoint", str(folder_with(home, "damaged", b"\x80junk"))],
        "/damaged: state.pt cannot be read"),
    "eval of a file that is no varcon checkpoint": (
        lambda home: ["eval", "--checkpoint", str(folder_with(home, "foreign", {"weights": [1.0]}) / "state.pt")],
        "/foreign/state.pt: state.pt is not a varcon checkpoint"),
    "eval of a model the store does not hold": (["eval", "--checkpoint", "models:/nope/1"],
                                                "holds no models:/nope/1"),
    "eval of a model URI without a version": (["eval", "--checkpoint", "models:/nope/latest"],
                                              "is not models:/NAME/VERSION"),
    "eval of a bucket URI without a bucket": (["eval", "--checkpoint", "s3://"],
                                              "storage URI s3:// names no bucket: write s3://BUCKET/path"),
    "eval of a checkpoint on a storage service that does not answer": (
        lambda home: ["eval", "--checkpoint",
                      f"s3://runs/r1?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1"],
        "cannot be read (When getting information for key 'r1' in bucket 'runs'"),
    "run storage URI without a bucket": (["train", "ray.storage_path=gs://"], "storage URI gs:// names no bucket"),
    # the cluster
    "more workers than CPUs": (["train", "ray.num_workers=4", "ray.resource_wait_s=0"],
                               "the run needs 4 CPU, 0 GPU but the Ray cluster has 2 CPU, 0 GPU"),
    "GPUs on a CPU cluster": (["train", "ray.use_gpu=true", "ray.resource_wait_s=0"],
                              "needs 2 CPU, 2 GPU but the Ray cluster has 2 CPU, 0 GPU"),
    "staged files larger than a node type's disk": (
        small_disk_cluster, "GB (train.beton, test.beton) but node type small_disk declares 1e-06 GB of local disk"),
    "tune trial larger than the cluster": (["tune", "ray.num_workers=4", "ray.resource_wait_s=0"],
                                           "needs 4 CPU, 0 GPU but the Ray cluster has"),
}


def folder_with(home, name, state=None):
    """``home/name``, holding ``state.pt`` with ``state`` (bytes as they are, else ``torch.save``) if given."""
    import torch

    folder = home / name
    folder.mkdir()
    if isinstance(state, bytes):
        (folder / "state.pt").write_bytes(state)
    elif state is not None:
        torch.save(state, folder / "state.pt")
    return folder


def files_under(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names}


@pytest.mark.cluster
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, varcon_home, ray_session, capsys):
    args, fragment = CASES[case]
    if callable(args):
        args = args(varcon_home)
    capsys.readouterr()
    before = files_under(varcon_home)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varcon: error:") and fragment in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    written = files_under(varcon_home) - before
    assert not written, written  # no store, no run folder, no half-written data file


def test_the_debug_flag_shows_the_traceback(varcon_home, capsys):
    assert main(["train", "--debug", "loss.tau1=0"]) == 2
    assert "Traceback" in capsys.readouterr().err
