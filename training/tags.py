"""Every MLflow tag key ringflow writes or reads, once (in the spirit of MLflow's
``mlflow/utils/mlflow_tags.py``), and the param and metric keys the tasks write and read by name.
Writers and readers import these names; a key renamed here is renamed on both sides. Values are
the keys as they are stored, so existing runs keep matching. (The per-epoch training metrics are
the epoch record's fields, logged by training/train.py; the metric names are
training/metric_names.py's.) tests/test_events.py fails on a key written or read as a literal.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- every ringflow run
KIND = "ringflow.kind"
"""What a run is: :data:`KIND_TRAINING` or :data:`KIND_MONITORING`."""
KIND_TRAINING = "training"
KIND_MONITORING = "monitoring"
KIND_TRAINING_STEP = "training-step"
"""A child run of a training run with ``training.final_fit`` (:data:`FINAL_FIT_STEP` says which)."""
LAUNCHER = "ringflow.launcher"
"""``host:pid:start`` of the process that owns the run (stale-run detection)."""
STALE = "ringflow.stale"
"""Why a run left RUNNING by a dead launcher was marked KILLED."""
ROLE = "ringflow.role"
"""A logged model's role in an evaluation (``baseline``)."""

# --------------------------------------------------------------------------- training runs
TASK_RUN_ID = "ringflow.task_run_id"
"""The Prefect task run: a retry of the same task run continues the same MLflow run."""
FLOW_RUN_ID = "ringflow.flow_run_id"
CONFIG_NAME = "ringflow.config_name"
REASON = "ringflow.reason"
"""Why the pipeline ran: ``manual``, ``scheduled`` or an anomaly's reason."""
ANOMALY_ID = "ringflow.anomaly_id"
"""The anomaly an adaptive rerun answers."""
HOSTS = "ringflow.hosts"
"""Distinct hosts the ranks ran on, comma-separated."""
TRAINING_STATUS = "training_status"
WORLD_SIZE = "world_size"
ELASTIC = "elastic"
DATA_FINGERPRINT = "data_fingerprint"
MANIFEST_PATH = "manifest_path"
CONFIG_HASH = "config_hash"
PARENT_RUN_ID = "parent_run_id"
"""The monitoring run that caused a rerun (training runs and model versions)."""
OUTPUT_DIR = "output_dir"
CHECKPOINT_DIR = "checkpoint_dir"
FINAL_FIT_STEP = "ringflow.final_fit_step"
"""``training.final_fit``: which child of the training run this is, :data:`STEP_SELECT` (train
window, early stopping on validation: the epoch count) or :data:`STEP_FINAL` (train + validation
for that many epochs: the candidate). The children are nested runs (MLflow's ``mlflow.parentRunId``)."""
STEP_SELECT = "select"
STEP_FINAL = "final"
FINAL_FIT_EPOCHS = "final_fit.epochs"
"""Not a tag: the param (training run and its ``final`` child) holding the final fit's epoch count."""
ATTEMPT_ERROR = "ringflow.attempt_{attempt}_error"
"""Format with ``attempt=``: the error of that training attempt."""

# --------------------------------------------------------------------------- evaluation (training run)
GATE_DECISION_RUN = "gate.decision"
GATE_PRIMARY_METRIC = "gate.primary_metric"
GATE_CHAMPION_VERSION = "gate.champion_version"
GATE_BASELINE = "gate.baseline"
GATE_WARNING = "gate.warning"
GATE_BASELINE_SETTINGS = "gate.baseline_settings"
"""The tuned baseline's chosen settings, ``name=value, ...`` (also params, :data:`BASELINE_PARAM_PREFIX`)."""
BASELINE_PARAM_PREFIX = "baseline."
"""Not a tag: the prefix of the run params holding the tuned baseline's chosen settings
(``baseline.learning_rate``, ``baseline.iterations``, ...)."""
BASELINE_FINAL_FIT = BASELINE_PARAM_PREFIX + "final_fit"
"""Not a tag: the param saying the scored baseline was refitted on train + validation (``training.final_fit``)."""
GATE_REASON_PREFIX = "gate.reason."
"""``gate.reason.<metric>`` (floors) and ``gate.reason.<check>.<metric>``."""

# --------------------------------------------------------------------------- model versions
TRAINING_RUN_ID = "training_run_id"
GIT_COMMIT = "git_commit"
TEST_ROC_AUC = "test_roc_auc"
GATE_DECISION = "gate_decision"
GATE_REASONS = "gate_reasons"

# --------------------------------------------------------------------------- registered models
ALIAS_HISTORY_PREFIX = "alias_history."
"""``alias_history.<UTC time>.<alias>``: one recorded alias move (JSON) per tag."""


def alias_history_key(stamp: str, alias: str) -> str:
    """The registered-model tag that records a move of ``alias`` at ``stamp``."""
    return f"{ALIAS_HISTORY_PREFIX}{stamp}.{alias}"


# --------------------------------------------------------------------------- params and metrics
DECISION_THRESHOLD = "decision_threshold"
"""The candidate's decision threshold: a metric of the training run, and a param of each logged
model (candidate and baseline) that predictions read back."""
TRAINING_WALL_TIME = "training_wall_time_s"
TEST_PREFIX = "test_"
"""``test_<metric>``: the candidate on the test window (training run)."""
CHAMPION_TEST_PREFIX = "champion_test_"
"""``champion_test_<metric>``: the champion scored on the same test rows."""
BASELINE_TEST_PREFIX = "baseline_test_"
"""``baseline_test_<metric>``: the baseline scored on the same test rows."""
BASELINE_TEST_ROC_AUC = f"{BASELINE_TEST_PREFIX}roc_auc"
BASELINE_VAL_ROC_AUC = "baseline_val_roc_auc"
"""The tuned baseline's validation AUC (the grid's best)."""
BASELINE_TUNING_TIME = "baseline_tuning_s"
"""What monitoring reads back as the baseline's reference AUC."""

# --------------------------------------------------------------------------- monitoring runs
MODEL_NAME = "ringflow.model_name"
MODEL_VERSION = "ringflow.model_version"
MONITORED_TRAINING_RUN_ID = "ringflow.training_run_id"
BATCH = "ringflow.batch"
BATCH_MONTH = "ringflow.batch_month"
BATCH_WINDOW = "ringflow.batch_window"
PREFECT_FLOW_RUN_ID = "ringflow.prefect_flow_run_id"
DECISION = "ringflow.decision"
ACTION = "ringflow.action"
ANOMALY_COUNT = "ringflow.anomaly_count"
ANOMALY_TYPES = "ringflow.anomaly_types"
ANOMALY_IDS = "ringflow.anomaly_ids"
RERUN_TRIGGERED = "ringflow.rerun_triggered"
RERUN_REASON = "ringflow.rerun_reason"
RERUN_ANOMALY_ID = "ringflow.rerun_anomaly_id"
RERUN_FLOW_RUN_ID = "ringflow.rerun_flow_run_id"
EVENT_ID = "ringflow.event_id"


def tag_filter(key: str, value: str) -> str:
    """An MLflow search filter on a tag (keys with dots need backticks)."""
    return f"tags.`{key}` = '{value}'"
