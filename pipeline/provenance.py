"""Which code produced a run: the git commit of the checkout the package runs from and, when the tree differs
from it, the uncommitted diff; outside a git tree (an installed wheel, or a ``ray job submit --working-dir``
upload, which carries no ``.git``) the package's version. No MLflow here: ``train_job`` logs what this returns.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib import metadata

from pipeline.config import REPO_ROOT

PACKAGE = "varcon-pipeline"


@dataclass(frozen=True)
class CodeVersion:
    commit: str  # "" outside a git tree
    diff: str  # ``git diff HEAD`` (tracked files), "" for a clean tree
    untracked: tuple[str, ...]  # files git does not know and does not ignore
    package_version: str

    @property
    def dirty(self) -> bool:
        return bool(self.diff or self.untracked)

    def tags(self) -> dict[str, str]:
        """MLflow tags: MLflow's own source-commit tag (the UI shows it) and ours."""
        found = {"varcon.package_version": self.package_version}
        if self.commit:
            found.update({"mlflow.source.git.commit": self.commit, "varcon.git_commit": self.commit,
                          "varcon.git_dirty": str(self.dirty).lower()})
        return found

    def patch(self) -> str:
        """The diff, and the untracked files named, as one text artifact."""
        listed = "".join(f"# untracked: {name}\n" for name in self.untracked)
        return listed + self.diff


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(done.stderr.strip())
    return done.stdout


def code_version() -> CodeVersion:
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        if _git("rev-parse", "--show-toplevel").strip() != str(REPO_ROOT):  # another project's tree around us
            return CodeVersion("", "", (), version)
        commit = _git("rev-parse", "HEAD").strip()
        diff = _git("diff", "HEAD", "--no-color")
        untracked = tuple(_git("ls-files", "--others", "--exclude-standard").split())
    except (OSError, subprocess.SubprocessError):  # no git, or not a git tree
        return CodeVersion("", "", (), version)
    return CodeVersion(commit, diff, untracked, version)
