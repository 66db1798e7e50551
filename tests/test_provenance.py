"""The code version a run records: a git commit with the uncommitted diff, else the package version."""
import subprocess

from pipeline import provenance


def git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_a_dirty_tree_gives_its_commit_diff_and_untracked_files(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "loss.py").write_text("tau = 0.1\n")
    git(tmp_path, "add", "loss.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    clean = provenance.code_version()
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert clean.commit == head.stdout.strip() and not clean.dirty
    assert clean.tags()["varcon.git_dirty"] == "false" and clean.tags()["mlflow.source.git.commit"] == clean.commit

    (tmp_path / "loss.py").write_text("tau = 0.2\n")
    (tmp_path / "new.py").write_text("x = 1\n")
    dirty = provenance.code_version()
    assert dirty.dirty and dirty.commit == clean.commit and dirty.untracked == ("new.py",)
    assert "-tau = 0.1" in dirty.patch() and "+tau = 0.2" in dirty.patch() and "# untracked: new.py" in dirty.patch()


def test_outside_a_git_tree_the_package_version_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    found = provenance.code_version()
    assert found.commit == "" and not found.dirty
    assert found.tags() == {"varcon.package_version": found.package_version} and found.package_version != "unknown"
