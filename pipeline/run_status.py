"""How a run ended: the one status type of trainings and sweep trials, and its MLflow run status."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Ending(enum.Enum):
    COMPLETED = "completed"  # every epoch trained: MLflow FINISHED
    EARLY_STOPPED = "early-stopped"  # a scheduler stopped it: KILLED, tagged early-stopped
    FAILED = "error"  # an exception or a diverged loss: FAILED, with the error as a tag


MLFLOW_STATUS = {Ending.COMPLETED: "FINISHED", Ending.EARLY_STOPPED: "KILLED", Ending.FAILED: "FAILED"}


@dataclass(frozen=True)
class RunStatus:
    """``ending`` and, for a failure, its one-line ``error``. ``str()`` is the trial table's cell:
    ``completed``, ``early-stopped`` or ``error: <error>``."""

    ending: Ending
    error: str = ""

    @classmethod
    def failed(cls, error: str) -> RunStatus:
        return cls(Ending.FAILED, error)

    @property
    def completed(self) -> bool:
        return self.ending is Ending.COMPLETED

    @property
    def mlflow_status(self) -> str:
        return MLFLOW_STATUS[self.ending]

    def __str__(self) -> str:
        return f"error: {self.error}" if self.ending is Ending.FAILED else self.ending.value


COMPLETED = RunStatus(Ending.COMPLETED)
EARLY_STOPPED = RunStatus(Ending.EARLY_STOPPED)
