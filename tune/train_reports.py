"""What a trial's Ray Train run tells Tune, in the run's controller process (no torch, no engine).

``EpochReportsToTune`` is Ray's ``TuneReportCallback`` for epochs only: a report made within an epoch (a
checkpoint on a preemption notice, ``PREEMPTION_STEP``) repeats the last epoch's metrics and is no result, so a
scheduler (ASHA's rungs, a stopper) never sees it as one more iteration.
"""
from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.names import PREEMPTION_STEP


class EpochReportsToTune(TuneReportCallback):
    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any = None) -> None:
        """Ray Train's report stream (``run_context``: its run, ``checkpoint``: the persisted one, if any)."""
        if metrics and PREEMPTION_STEP in metrics[0]:
            return
        super().after_report(run_context, metrics, checkpoint)
