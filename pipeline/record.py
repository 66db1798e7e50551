"""A run's record (``record.json`` beside a checkpoint's weights): what the run produced up to an epoch, readable
without torch, Ray or MLflow (Ray Train's controller reads it to forward metrics; see ``pipeline.checkpoint``)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.names import EPOCH, MONITOR

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from pyarrow.fs import FileSystem

RECORD_FILE = "record.json"
FORMAT_VERSION = 2


@dataclass
class RunRecord:
    """What a run produced up to ``epoch``: ``entries`` are ``[step, key, value, timestamp_ms]``; steps up to
    ``inherited_through`` came with a PBT/PB2 exploit from the donor's lineage (they describe the weights, and
    are never sent to this run's MLflow run)."""

    run_id: str
    run_key: str
    identity: str  # ``pipeline.identity.identity_digest`` of the config that trained it
    epoch: int = 0
    entries: list = field(default_factory=list)
    exploits: list = field(default_factory=list)  # [{epoch, donor_run_id}] of the weights' lineage
    inherited_through: int = -1
    format_version: int = FORMAT_VERSION

    def add(self, step: int, metrics: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        self.entries += [[step, key, float(value), stamp] for key, value in sorted(metrics.items())]

    def own_entries(self, after_step: int = -1) -> list:
        """Entries of this run's own epochs after ``after_step``."""
        floor = max(after_step, self.inherited_through)
        return [entry for entry in self.entries if entry[0] > floor]

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """``{metric: [(step, value)]}`` over the weights' lineage, in step order."""
        curves: dict[str, list[tuple[int, float]]] = {}
        for step, key, value, _ in sorted(self.entries, key=lambda e: e[0]):
            curves.setdefault(key, []).append((step, value))
        return curves

    def monitor(self, key: str, epoch: int) -> float:
        """The latest value of ``key`` up to ``epoch`` (what ranks checkpoints), ``-inf`` before any."""
        values = [(step, value) for step, k, value, _ in self.entries if k == key and step <= epoch]
        return max(values)[1] if values else float("-inf")

    def report(self, monitor_key: str | None) -> dict:
        """What a worker reports after ``epoch``: that epoch's metrics, the epoch and the monitor following
        ``monitor_key`` (none without a validation split: ``None``)."""
        monitor = {MONITOR: self.monitor(monitor_key, self.epoch)} if monitor_key else {}
        return {**self.at(self.epoch), EPOCH: self.epoch, **monitor}

    def at(self, step: int) -> dict[str, float]:
        return {key: value for s, key, value, _ in self.entries if s == step}

    def continued_by(self, run_id: str, run_key: str, identity: str, source: dict | None = None) -> RunRecord:
        """This record as the start of another run that continues from the same weights (a PBT/PB2 exploit):
        the lineage is kept, the link recorded (with ``source``: where the state came from), nothing of it is
        this run's own."""
        link = {"epoch": self.epoch, "donor_run_id": self.run_id, **(source or {})}
        return RunRecord(run_id, run_key, identity, self.epoch, list(self.entries), self.exploits + [link],
                         self.epoch)

    def trained_every_epoch(self, epochs: int) -> bool:
        """The one test of a finished training: its record reaches the config's last epoch."""
        return self.epoch >= epochs

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        raw = json.loads(text)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint record format {raw.get('format_version')} is not {FORMAT_VERSION}")
        return cls(**raw)


def load_record(folder: str | Path) -> RunRecord:
    """The run record in a checkpoint folder."""
    return RunRecord.from_json((Path(folder) / RECORD_FILE).read_text())


class StoredCheckpoint(Protocol):
    """A Ray (Train or Tune) ``Checkpoint`` as this package uses it, for the annotations of the modules that must
    not import Ray: the folder's filesystem and path in it, and ``as_directory`` (a local folder for a block)."""

    @property
    def filesystem(self) -> FileSystem: ...
    @property
    def path(self) -> str: ...
    def as_directory(self) -> AbstractContextManager[str]: ...


def read_record(found: StoredCheckpoint) -> RunRecord:
    """The ``RunRecord`` of a Ray (Train or Tune) ``Checkpoint`` (anything with ``filesystem`` and ``path``),
    read through its own filesystem (local, shared or a bucket) without fetching the weights."""
    with found.filesystem.open_input_stream(f"{found.path}/{RECORD_FILE}") as stream:
        return RunRecord.from_json(stream.read().decode())
