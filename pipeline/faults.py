"""Fault injection for tests: the one module that knows about it.

A test writes the faults it wants as JSON to the file named by ``$VARCON_FAULTS_FILE`` (the test session sets
that variable for the driver and, through Ray's runtime environment, for every Ray process). Whoever builds a
worker's argument (``pipeline.worker.worker_argument``) calls ``for_run(run_key)``, so the faults
travel to the workers inside that argument and nowhere else. Keys:

- ``fail_after_epoch: k``: rank 0 raises once, after epoch k's checkpoint of a fresh start.
- ``nan_after_epoch: k``: rank 0 puts a NaN into the weights after epoch k, so the next epoch's loss is not finite.
- ``preempt_in_epoch: {"epoch": e, "step": s, "signals": folder}``: at step s of epoch e (a preemption check of
  a fresh start), rank 0 writes ``folder/holding`` and the ranks wait there until Ray reports a preemption notice
  (the test drains the node); after the checkpoint on that notice rank 0 writes ``folder/checkpointed`` and the
  ranks wait until the node is gone (the test removes it). Each wait ends after ``HOLD_LIMIT_S`` with an error;
  an attempt after the checkpoint passes there without waiting.
- ``upload_in_flight_at_stop: {"epoch": e, "signals": folder}`` (``ray.checkpoint_upload: async``): rank 0's
  upload of epoch e-1's checkpoint waits until epoch e's checkpoint was handed to Ray, so whatever epoch e-1's
  result makes a scheduler do comes while epoch e's upload is in flight; that upload stores its files, writes
  the run key to ``folder/held`` and never reports (the trial is stopped or the wait ends after ``HOLD_LIMIT_S``).
- ``runs: [i, ...]``: only the i-th distinct runs to ask get the faults, counted from 1 (in a sweep with
  ``tune.max_concurrent_trials=1``: the i-th trial); a run gets the same answer on every later attempt.
  ``runs: {i: {faults}, ...}`` gives the i-th run its own faults.
- ``exit_sweep_after_trials: n``: the sweep driver dies (exit code 3) once n trials have completed, as with a
  lost head node (``sweep_callbacks``).

Without the variable nothing is read and nothing is injected.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from ray.tune.experiment import Trial

FILE_VARIABLE = "VARCON_FAULTS_FILE"


def _path() -> Path | None:
    name = os.environ.get(FILE_VARIABLE)
    return Path(name) if name else None


def for_run(run_key: str) -> dict:
    """The faults that apply to the run ``run_key`` (claiming one of ``runs`` if it is limited)."""
    path = _path()
    if path is None or not path.is_file():
        return {}
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        faults = json.loads(path.read_text() or "{}")
        if "runs" not in faults:
            return faults
        askers = faults.setdefault("askers", [])
        if run_key not in askers:
            askers.append(run_key)
            path.write_text(json.dumps(faults))
        position = askers.index(run_key) + 1
        if isinstance(faults["runs"], dict):  # JSON's keys are strings
            return faults["runs"].get(str(position), {})
        return faults if position in faults["runs"] else {}


def fails_after_epoch(faults: dict, epoch: int, resumed: bool) -> bool:
    """Whether rank 0 fails after epoch ``epoch`` (``fail_after_epoch``, once: a resumed run trains on). That
    epoch's checkpoint is committed first (the worker reports it synchronously): with asynchronous uploads the
    failure could overtake the upload, and the retry, finding no checkpoint, would start over and fail again."""
    return not resumed and faults.get("fail_after_epoch") == epoch


def after_epoch(faults: dict, epoch: int, resumed: bool, model: torch.nn.Module) -> None:
    """Rank 0's hook after epoch ``epoch`` was reported (``model``: the plain module)."""
    import torch

    if faults.get("nan_after_epoch") == epoch:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    if fails_after_epoch(faults, epoch, resumed):
        raise RuntimeError(f"injected failure after epoch {epoch} (fail_after_epoch)")


HOLD_LIMIT_S = 600.0


def _preempting(faults: dict, epoch: int, step: int, after_checkpoint: bool = False) -> dict | None:
    """The ``preempt_in_epoch`` fault if it applies at ``step`` of ``epoch``: once (a later attempt that passes
    there again, having restarted from an earlier checkpoint, trains on)."""
    found = faults.get("preempt_in_epoch")
    if not found or (found["epoch"], found["step"]) != (epoch, step):
        return None
    return None if (Path(found["signals"]) / "checkpointed").exists() and not after_checkpoint else found


def _hold(until: Callable[[], bool], what: str) -> None:
    import time

    started = time.monotonic()
    while not until():
        if time.monotonic() - started > HOLD_LIMIT_S:
            raise RuntimeError(f"injected fault: no {what} after {HOLD_LIMIT_S:.0f} s")
        time.sleep(0.2)


def held_until_notice(faults: dict, epoch: int, step: int, rank: int, notice: Callable[[], bool]) -> None:
    """Before the preemption check at ``step`` of ``epoch``: wait there for the notice the test brings about."""
    found = _preempting(faults, epoch, step)
    if found is None:
        return
    if rank == 0:
        (Path(found["signals"]) / "holding").touch()
    _hold(notice, "preemption notice (preempt_in_epoch)")


def hold_until_gone(faults: dict, epoch: int, step: int, rank: int) -> None:
    """After the checkpoint on the notice: wait until the test takes the node away (this process with it)."""
    found = _preempting(faults, epoch, step, after_checkpoint=True)
    if found is None:
        return
    if rank == 0:
        (Path(found["signals"]) / "checkpointed").touch()
    _hold(lambda: False, "end of the node (preempt_in_epoch)")


def held_upload(faults: dict, epoch: int) -> tuple[Callable[[], None], Callable[[str], None]] | None:
    """``upload_in_flight_at_stop`` for rank 0's async upload of epoch ``epoch``'s checkpoint: what to run before
    its files are stored and after (given the run key); ``None`` where the fault does not apply."""
    found = faults.get("upload_in_flight_at_stop")
    if not found or epoch not in (found["epoch"] - 1, found["epoch"]):
        return None
    signals = Path(found["signals"])
    if epoch < found["epoch"]:
        return (lambda: _hold((signals / "handed_over").exists, "next checkpoint (upload_in_flight_at_stop)"),
                lambda _: None)

    def stored(run_key: str) -> None:
        (signals / "held").write_text(run_key)
        _hold(lambda: False, "stop of the trial (upload_in_flight_at_stop)")

    return lambda: None, stored


def handed_over(faults: dict, epoch: int) -> None:
    """After rank 0 handed epoch ``epoch``'s checkpoint to Ray: lets ``upload_in_flight_at_stop``'s first
    upload go on."""
    found = faults.get("upload_in_flight_at_stop")
    if found and epoch == found["epoch"]:
        (Path(found["signals"]) / "handed_over").touch()


def sweep_callbacks() -> list:
    """Tune callbacks for the sweep driver: the driver-death hook when asked for, else none."""
    path = _path()
    if path is None or not path.is_file() or "exit_sweep_after_trials" not in json.loads(path.read_text() or "{}"):
        return []
    from ray.tune import Callback

    class ExitAfterTrials(Callback):
        """Ends the driver once n trials completed; reads the file at call time, so a restored sweep (which
        restores this callback too) runs on once the fault is gone."""

        def __init__(self) -> None:
            self.completed = 0

        def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            self.completed += 1
            current = _path()
            limit = json.loads(current.read_text() or "{}").get("exit_sweep_after_trials") \
                if current is not None and current.is_file() else None
            if limit and self.completed >= limit:
                os._exit(3)

    return [ExitAfterTrials()]
