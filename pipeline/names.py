"""Names shared across layers: MLflow tags, report keys and the monitor. One place, so that a rename is one edit."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import EvalConfig

# MLflow tags
RUN_KEY_TAG = "varcon.run_key"  # the run's identity (``pipeline.identity.run_key``): found again on every attempt
RUN_FOLDER_TAG = "varcon.run_folder"  # where the run's checkpoints live (``<ray.storage_path>/<run key>``)
ATTEMPTS_TAG = "varcon.attempts"  # how many commands have driven the run; attempts/<n>.yaml holds each one's config
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows children under the parent
MODEL_URI_TAG = "varcon.model_uri"  # where the run's final encoder was logged (for the Model Registry)
REGISTERED_TAG = "varcon.registered_model"  # NAME/VERSION of the registered encoder
ERROR_TAG = "varcon.error"  # why a run failed (or diverged)
EARLY_STOPPED_TAG = "varcon.early_stopped"  # "true": a sweep's scheduler ended the trial before its last epoch
EXPLOITS_TAG = "varcon.exploits"  # JSON list of {epoch, donor_run_id, donor_checkpoint, donor_state_sha256}: the
# PBT/PB2 lineage of the run's weights
SWEEP_TAG = "varcon.sweep"  # the sweep a parent run or trial run belongs to
TRIAL_ID_TAG = "varcon.trial_id"  # Tune's id of the trial a run trains
KIND_TAG = "varcon.kind"  # "sweep" on a sweep's parent run

# keys of the reports workers send through Ray (and Tune's results)
EPOCH = "epoch"  # completed epochs; 0 is the randomly initialised encoder
MONITOR = "monitor_top1"  # the latest validation kNN top-1 (first eval.knn_k): ranks checkpoints, drives sweeps
DIVERGED = "diverged"  # the reason, in the last report of a training whose loss became non-finite
PREEMPTION_STEP = "preemption_step"  # in a report within an epoch (a preemption notice): the steps trained of it
CHECKPOINT_RANK = "checkpoint_rank"  # what Ray Train ranks a run's checkpoints by (keeps the best two and latest)
MID_EPOCH_RANK = -1.0  # a mid-epoch checkpoint's rank: below every epoch's, so the next two epochs' replace it


def monitor_source(eval_config: EvalConfig) -> str:
    """The metric ``MONITOR`` follows: validation kNN top-1 with the first ``eval.knn_k`` (never a test metric)."""
    return f"val_knn_top1_k{eval_config.knn_k[0]}"
