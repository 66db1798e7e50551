"""What a trial's Ray Train run tells Tune, and how a population scheduler's exploit hands a trial its start.

Every trial, whatever the scheduler, is a Ray Train run started from a Tune function (``tune.trainables``). Ray
Train reports reach its controller, not the trial's process, where Tune's session lives:
``pipeline.ray_callbacks.TrialReportSender`` puts each epoch's report on a Ray queue, and ``relay`` (in the trial's
process) hands them to ``ray.tune.report`` while the training runs in a thread of its own.

The one difference between schedulers is here (``Handover``): a population scheduler (PBT, PB2) pauses every trial
at each perturbation and restarts it from the Tune checkpoint it chooses (the trial's own last one, or a donor's
after an exploit). Ray Train V2 reports no Tune checkpoint, so each report that carries a persisted Train
checkpoint also reports a small Tune checkpoint naming it (``POINTER_FILE``: copying the training state into Tune's
folder would store it twice). A restarted trial reads it (``ray.tune.get_checkpoint``) and trains as a new Ray Train
run (``train_job.Segment``: a run of the trial's own name would resume the trial's own checkpoints, the receiver's
weights under the donor's values) whose workers start from that checkpoint with its full resume state. Each segment
writes to a folder of its own, so Train's retention in the segments that go on never deletes a checkpoint a pointer
names before it is read; once the sweep is over, a trial's segments that hold none of its kept checkpoints go
(``drop_other_segments``). FIFO and ASHA trials report no Tune checkpoint and run as their run key's one Ray Train
run.
"""
from __future__ import annotations

import json
import posixpath
import re
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import checkpoint, storage
from pipeline.names import EPOCH
from pipeline.storage import Location
from pipeline.train_job import Checkpointed, RunPlan, Segment

POINTER_FILE = "train_checkpoint.json"  # a Tune checkpoint's one file: {"uri": the Train checkpoint, "epoch": n}
CHECKPOINT_PATH_KEY = "checkpoint_path"  # in a result: the persisted Train checkpoint, as Ray's TuneReportCallback


def relay(train: Callable[[], Any], queue, report: Callable[[dict, str | None], None], poll_s: float = 0.5) -> Any:
    """Run ``train()`` in a thread and hand every item of ``queue`` to ``report`` here, in order, until the training
    ended and the queue is empty; returns what ``train`` returned (raises what it raised). Tune stops or pauses a
    trial from within ``report``: ``ray.tune.report`` raises ``SystemExit`` here, the trial's function ends, and the
    trial's actor exits; the training thread is a daemon, and the Ray Train controller and workers it started (owned
    by this process) end with it."""
    from ray.util.queue import Empty

    ended, box = threading.Event(), {}

    def run() -> None:
        try:
            box["returned"] = train()
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread
            box["raised"] = exc
        finally:
            ended.set()

    threading.Thread(target=run, name="varcon-trial-training", daemon=True).start()
    while True:
        try:
            report(*queue.get(timeout=poll_s))
        except Empty:
            if ended.is_set() and queue.empty():
                break
    if "raised" in box:
        raise box["raised"]
    return box.get("returned")


@dataclass(frozen=True)
class Handover:
    """How a trial starts and what it reports with its results: ``population`` (PBT, PB2) reports a Tune checkpoint
    naming each persisted Train checkpoint and restarts as a new segment from the one Tune hands it; otherwise the
    trial is its run key's Ray Train run and reports metrics only."""

    population: bool
    storage_path: Location  # where the trial's Ray Train runs store their checkpoints (``ray.storage_path``)

    def segment(self, run_key: str) -> Segment:
        """The Ray Train run this start of the trial trains as: a population trial's new segment, named
        ``<run key>-<random>``, from the Train checkpoint its Tune checkpoint names (none at the first start)."""
        import ray.tune

        if not self.population:
            return Segment(run_key)
        given = ray.tune.get_checkpoint()
        return Segment(f"{run_key}-{uuid.uuid4().hex[:8]}", pointed_to(given) if given is not None else "",
                       metrics_before_next=True)

    def report(self, metrics: dict, checkpoint_path: str | None) -> None:
        """One epoch's result to Tune, with a pointer to its Train checkpoint where a population scheduler reads one."""
        import ray.tune

        if checkpoint_path is not None:
            metrics = {**metrics, CHECKPOINT_PATH_KEY: checkpoint_path}
        if not (self.population and checkpoint_path is not None):
            ray.tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="varcon-pointer-") as folder:
            uri = self.storage_path.on_same(checkpoint_path).uri
            (Path(folder) / POINTER_FILE).write_text(json.dumps({"uri": uri, "epoch": metrics.get(EPOCH)}))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def pointed_to(tune_checkpoint) -> str:
    """The Train checkpoint (a path or URI) a population trial's Tune checkpoint names."""
    with tune_checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / POINTER_FILE).read_text())["uri"]


def pointed_checkpoints(result) -> list[Checkpointed]:
    """A population trial's Train checkpoints named by the Tune checkpoints Tune kept of it (``Result``: the latest
    and the best few), oldest first; one that Train's retention in its segment has removed since is left out."""
    found = [c for c, _ in result.best_checkpoints or []] + ([result.checkpoint] if result.checkpoint else [])
    kept = {}
    for tune_checkpoint in found:
        folder = storage.location(pointed_to(tune_checkpoint))
        if (folder / checkpoint.RECORD_FILE).is_file():
            kept[folder.uri] = Checkpointed.at(folder)
    return sorted(kept.values(), key=lambda c: (c.record.epoch, c.mid_epoch))


def drop_other_segments(plan: RunPlan, kept: list[Checkpointed]) -> list[Location]:
    """Delete a finished population trial's segments (``<run key>-<8 hex>``: a Ray Train run per start of the
    trial, ``Handover.segment``) that hold none of its ``kept`` checkpoints; returns them. Only once the sweep is
    over: until then another trial may still start from one (an exploit's lineage keeps the donor checkpoint's
    URI and its state's sha256, not the files)."""
    if not kept:  # no checkpoint read back (an errored trial): nothing to tell the segments apart by
        return []
    segment = re.compile(rf"{re.escape(plan.run_key)}-[0-9a-f]{{8}}")
    holding = {posixpath.dirname(posixpath.normpath(c.folder.path)) for c in kept}
    dropped = [folder for folder in plan.storage_path.folders(f"{plan.run_key}-")
               if segment.fullmatch(folder.name) and posixpath.normpath(folder.path) not in holding]
    for folder in dropped:
        folder.delete_folder()
    return dropped
