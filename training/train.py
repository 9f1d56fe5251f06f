"""The Horovod training program (one process per rank; never imports Prefect).

    horovodrun -np N -H localhost:N --gloo python -m ringflow.training.train \\
        --manifest M --config-json '<PipelineConfig json>' --output-dir DIR [--resume]

Each rank reads its own shards (checksums verified, decrypted in memory with RINGFLOW_DATA_KEY),
gradients are averaged with ring-allreduce, and rank 0 logs to the ONE MLflow run named by
``MLFLOW_RUN_ID`` (none when unset), writes a checkpoint per epoch and the outputs:
``model.pt``, ``preprocessor.json``, ``summary.json`` and ``checkpoints/epoch-NNNN.pt``.

Determinism: the data order and dropout of epoch k are a function of (seed, epoch, rank) only,
so a run resumed from a checkpoint ends with exactly the weights of an uninterrupted run.

One epoch loop, :func:`train`, over a state of Horovod's shape (``training/state.py``): the
fixed-size driver calls it once, the elastic driver through ``hvd.elastic.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError

from ringflow.training import tags
from ringflow.training.averaging import WeightAverage, weight_average
from ringflow.training.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    CheckpointPayload,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from ringflow.training.config import PipelineConfig, TrainingConfig, get_settings
from ringflow.training.environment import quiet_library_logs, usable_cores
from ringflow.training.final_fit import FINAL_EPOCHS_ARG, THRESHOLD_ARG, FinalFit, validation_rows_for_rank
from ringflow.training.launch import FATAL_EXIT, FATAL_PREFIX
from ringflow.training.manifest import FileEntry, Manifest, MissingKeyError, ShardIntegrityError
from ringflow.training.memory import peak_rss_mb
from ringflow.training.metric_names import METRIC_NAMES
from ringflow.training.metrics import classification_metrics, max_f1_threshold
from ringflow.training.model import TabularNet, predict_logits, save_model
from ringflow.training.preprocess import Preprocessor
from ringflow.training.secrets import SecretsFileError, load_secrets
from ringflow.training.state import FixedState, HorovodOptimizer, Outcome, Progress, TrainingState, restore
from ringflow.training.summary import DivergedAt, EpochRecord, RankThroughput, TrainingSummary
from ringflow.training.system_metrics import host_system_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- pure helpers


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed per (seed, epoch, rank): resumed epochs replay exactly."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def epoch_order(rows: int, needed: int, seed: int, epoch: int, rank: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``needed`` row indices: shuffled, cycling through fresh permutations when a rank has fewer
    rows than the agreed number of steps needs (uneven shards)."""
    rng = np.random.default_rng(epoch_seed(seed, epoch, rank))
    perms = [rng.permutation(rows) for _ in range(max(1, math.ceil(needed / rows)))]
    return np.concatenate(perms)[:needed]


def learning_rate(tc: TrainingConfig, size: int, step: int, steps_per_epoch: int) -> float:
    """Base LR scaled by the world size, reached by a linear warm-up (Goyal et al. 2017); then
    constant, or (``lr_schedule: cosine``) decayed along a half cosine to ``min_lr_fraction`` of
    it at the last planned step (Loshchilov & Hutter 2017): large steps early, small steps
    while early stopping picks the best epoch."""
    base = tc.learning_rate
    target = base * size if tc.scale_lr_by_world_size else base
    warm = tc.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return base + (target - base) * step / warm
    if tc.lr_schedule == "constant":
        return target
    total = tc.epochs * steps_per_epoch
    progress = min(1.0, (step - warm) / max(1.0, total - warm))
    floor = target * tc.min_lr_fraction
    return floor + (target - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------- rank data


class NoShardError(ValueError):
    """More ranks than shards: a rank would have nothing to read."""


@dataclass
class RankData:
    x_num: torch.Tensor
    x_cat: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_frame(manifest: Manifest, entries: Sequence[FileEntry], pre: Preprocessor) -> RankData:
    """This rank's rows as compact tensors, filled row group by row group: the file's (decrypted)
    bytes and one row group as a frame at a time, never the whole shard as a DataFrame."""
    n = sum(e.rows for e in entries)
    x_num = np.empty((n, len(pre.numeric_inputs)), dtype=np.float32)
    x_cat = np.empty((n, len(pre.categorical_inputs)), dtype=np.int64)
    y = np.empty(n, dtype=np.float32)
    columns = [*pre.source_columns, manifest.target_column]
    at = 0
    for entry in entries:
        pf = manifest.open(entry)
        for i in range(pf.num_row_groups):
            part = pf.read_row_group(i, columns=columns).to_pandas()
            k = len(part)
            x_num[at : at + k], x_cat[at : at + k] = pre.transform(part)
            y[at : at + k] = part[manifest.target_column].to_numpy(dtype=np.float32)
            at += k
        del pf
    if at != n:
        raise ShardIntegrityError(f"{[e.file for e in entries]} hold {at} rows, the manifest says {n}")
    return RankData(torch.from_numpy(x_num), torch.from_numpy(x_cat), torch.from_numpy(y))


# --------------------------------------------------------------------------- MLflow (rank 0 only)


class RunLogger:
    """Logs to the run the launcher created (``MLFLOW_RUN_ID``); a no-op without one.

    Uses the client API, never ``start_run``: ending the run is the launcher's job. Every rank
    holds one for the whole process, and it opens its client on first use: only rank 0 logs (a
    store per rank would be as many writers on a SQLite file), and under elastic training the
    process that is rank 0 can change at a reset, keeping the client it opened.

    The calls are queued and done in order by one background thread, so rank 0 does not stop
    training while MLflow imports (seconds, at the first epoch) and writes: the other ranks
    would wait for it at the next allreduce. :meth:`flush` waits for them and raises the first
    error; rank 0 calls it before it reports the run done.
    """

    def __init__(self) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID")
        self._client: MlflowClient | None = None
        self._queue: queue.Queue[Callable[[], None] | None] | None = None
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    def _submit(self, call: Callable[[], None]) -> None:
        if not self.run_id:
            return
        if self._queue is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, daemon=True, name="mlflow-run-logger")
            self._thread.start()
        self._queue.put(call)

    def _work(self) -> None:
        assert self._queue is not None
        while (call := self._queue.get()) is not None:
            try:
                if not self._errors:  # after a failure the rest is skipped; flush raises it
                    call()
            except BaseException as e:  # noqa: BLE001 - raised by flush() in the training thread
                self._errors.append(e)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything queued is logged; raise the first error."""
        if self._queue is not None:
            self._queue.join()
        if self._errors:
            raise self._errors[0]

    def _open(self) -> tuple[MlflowClient, str] | None:
        """The client and the run id, or None without a run."""
        if not self.run_id:
            return None
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))
        return self._client, self.run_id

    def params(self, params: dict[str, Any]) -> None:
        self._submit(lambda: self._params(params))

    def _params(self, params: dict[str, Any]) -> None:
        if (opened := self._open()) is None:
            return
        client, run_id = opened
        from mlflow.entities import Param

        # Params are immutable: a resumed run keeps the values it started with.
        have = client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict[str, float | None], step: int) -> None:
        ts = int(time.time() * 1000)  # when it was measured, not when the thread gets to it
        self._submit(lambda: self._metrics(metrics, step, ts))

    def _metrics(self, metrics: dict[str, float | None], step: int, ts: int) -> None:
        if (opened := self._open()) is None:
            return
        client, run_id = opened
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        client.log_batch(run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        self._submit(lambda: self._tag(key, value))

    def _tag(self, key: str, value: str) -> None:
        if (opened := self._open()) is not None:
            client, run_id = opened
            client.set_tag(run_id, key, value)


def flat_params(cfg: PipelineConfig, size: int, manifest: Manifest, final: FinalFit | None = None) -> dict[str, Any]:
    def flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    params = flatten(cfg.training.model_dump(mode="json"), "training.")
    params.update(
        {
            "world_size": size,
            "data.fingerprint": manifest.fingerprint,
            "data.train_rows": manifest.windows["train"].rows,
            "data.num_shards": len(manifest.shards),
        }
    )
    if final is not None:
        params[tags.FINAL_FIT_EPOCHS] = final.epochs
        params["data.validation_rows"] = manifest.windows["validation"].rows
    return params


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Holds the model, optimizer and this rank's data; runs one epoch at a time.

    Every collective is issued in the same order on every rank, so uneven shards cannot hang:
    all ranks run the same number of steps per epoch (agreed with an allgather of shard sizes).
    """

    def __init__(self, hvd: ModuleType, cfg: PipelineConfig, manifest: Manifest, final: FinalFit | None = None) -> None:
        self.hvd = hvd
        self.final = final
        """A final fit (``training.final_fit``): train + validation rows, ``final.epochs`` epochs,
        no validation."""
        self.cfg = cfg
        self.tc = cfg.training
        self.manifest = manifest
        self.pre = manifest.read_preprocessor()
        torch.manual_seed(self.tc.seed)  # identical init on every rank (and broadcast anyway)
        self.net = TabularNet.for_preprocessor(self.pre, self.tc.model)
        self.average: WeightAverage | None = weight_average(self.net, self.tc.ema_decay)
        """``training.ema_decay``: the moving average of the weights, updated after every step."""
        groups = self.net.param_groups(self.tc.weight_decay, self.tc.model.level_weight_decay)
        base = torch.optim.AdamW(groups, lr=self.tc.learning_rate)
        hv = self.tc.horovod
        self.opt = hvd.DistributedOptimizer(
            base,
            named_parameters=self.net.named_parameters(),
            compression=hvd.Compression.fp16 if hv.compression == "fp16" else hvd.Compression.none,
            backward_passes_per_step=hv.backward_passes_per_step,
            op=hvd.Average,
            # Not under elastic: after a reset, a worker that rejoined and the one that stayed
            # waited on each other's grouped allreduce until the run timed out (CI, 2026-12-07:
            # tests/test_cluster.py::test_elastic_training_goes_on_without_h2_and_h2_rejoins)
            groups=(hv.num_groups or None) if not self.tc.elastic.enabled else None,
        )
        self._layout: tuple[int, int] | None = None
        self._data: RankData | None = None
        self._val: RankData | None = None

    @property
    def data(self) -> RankData:
        """This rank's training rows (loaded by :meth:`prepare`)."""
        if self._data is None:
            raise RuntimeError("Trainer.prepare() loads the data first")
        return self._data

    @property
    def val(self) -> RankData:
        """This rank's slice of the validation rows (loaded by :meth:`prepare`; a final fit has none)."""
        if self._val is None:
            raise RuntimeError("Trainer.prepare() loads the data first (a final fit has no validation rows)")
        return self._val

    @property
    def scored_net(self) -> TabularNet:
        """The weights that are validated, kept as the best model and exported: the moving
        average with ``training.ema_decay``, else the trained weights themselves."""
        return self.average.net if self.average is not None else self.net

    @property
    def epochs(self) -> int:
        """The epochs this run trains at most: ``training.epochs``, or the final fit's k."""
        return self.final.epochs if self.final is not None else self.tc.epochs

    # ------------------------------------------------------------------ data for (rank, size)
    def prepare(self) -> None:
        """(Re)load this rank's shards and agree on per-rank batch sizes and steps per epoch.

        Called again after an elastic reset, when rank and size change.
        """
        hvd = self.hvd
        rank, size = hvd.rank(), hvd.size()
        if self._layout != (rank, size):
            entries = self.manifest.shards_for_rank(rank, size)
            if not entries:
                raise NoShardError(
                    f"rank {rank} of {size} has no shard: the manifest has {len(self.manifest.shards)} shards; "
                    "re-shard with sharding.num_shards >= world size"
                )
            data = load_frame(self.manifest, entries, self.pre)
            val = load_frame(self.manifest, [self.manifest.validation], self.pre)
            # each rank scores a strided slice of the validation file; predictions are allgathered
            mine = validation_rows_for_rank(len(val), rank, size)
            val = RankData(val.x_num[mine], val.x_cat[mine], val.y[mine])
            if self.final is None:
                self._data, self._val = data, val
            else:
                # the final fit trains on the same slice instead: every validation row on one rank
                self._data = RankData(
                    torch.cat([data.x_num, val.x_num]), torch.cat([data.x_cat, val.x_cat]), torch.cat([data.y, val.y])
                )
                self._val = None
            self._layout = (rank, size)
        rows = hvd.allgather_object(len(self.data))
        # where each rank runs: horovodrun's name for its host (-H / discovery), which tells
        # namespace hosts apart even when they share one hostname
        self.hosts = hvd.allgather_object(os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname())
        total = sum(rows)
        # Batch size in proportion to the shard: weighted shards (straggler compensation) give a
        # slow rank fewer rows per step, and every rank still runs the same number of steps.
        self.batch = [max(1, round(self.tc.batch_size * r * size / total)) for r in rows]
        self.steps = max(math.ceil(r / b) for r, b in zip(rows, self.batch, strict=True))
        # loss weight so the averaged gradient is the mean over the global batch
        self.loss_weight = self.batch[rank] * size / sum(self.batch)
        self.opt_steps = math.ceil(self.steps / self.tc.horovod.backward_passes_per_step)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> EpochRecord:
        """Train epoch ``epoch`` (0-based). Returns the agreed epoch record; ``diverged`` is True on
        every rank as soon as any rank saw a non-finite loss (the step is then not applied)."""
        hvd, tc = self.hvd, self.tc
        rank, size = hvd.rank(), hvd.size()
        torch.manual_seed(epoch_seed(tc.seed, epoch, rank) + 1)  # dropout masks
        bs = self.batch[rank]
        order = torch.from_numpy(epoch_order(len(self.data), self.steps * bs, tc.seed, epoch, rank))
        k = tc.horovod.backward_passes_per_step
        self.net.train()
        self.opt.zero_grad()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        loss_acc = torch.zeros((), dtype=torch.float64)  # losses of applied updates only
        window = torch.zeros((), dtype=torch.float64)  # losses since the last update
        compute_s = 0.0
        diverged_step = None
        t_epoch = time.perf_counter()
        for i in range(self.steps):
            t0 = time.perf_counter()
            idx = order[i * bs : (i + 1) * bs]
            # the mean of the members' losses (TabularNet.training_loss; one member: its BCE)
            loss = self.net.training_loss(self.data.x_num[idx], self.data.x_cat[idx], self.data.y[idx])
            (loss * self.loss_weight / k).backward()
            compute_s += time.perf_counter() - t0
            if not torch.isfinite(loss):
                for p in params:  # make sure the allreduce below carries this rank's verdict
                    if p.grad is not None:
                        p.grad.fill_(math.nan)
            window += loss.detach()
            if (i + 1) % k == 0 or i + 1 == self.steps:
                # The gradient allreduce: a NaN/inf on any rank makes the averaged gradient
                # non-finite on every rank, so all ranks agree to stop on the same step without
                # a collective of their own (benchmarks/README.md: 1.09x), and none applies it.
                self.opt.synchronize()
                if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                    diverged_step = (i // k) * k  # the first step of the update not applied
                    break
                lr = learning_rate(tc, size, epoch * self.opt_steps + i // k, self.opt_steps)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                with self.opt.skip_synchronize():
                    self.opt.step()
                if self.average is not None:
                    self.average.update(self.net)  # the ranks' weights are identical: no collective
                self.opt.zero_grad()
                loss_acc += window
                window.zero_()
        wall = time.perf_counter() - t_epoch
        steps_done = diverged_step if diverged_step is not None else self.steps
        loss_sum = torch.stack([loss_acc * bs, torch.tensor(float(steps_done * bs), dtype=torch.float64)])
        totals = hvd.allreduce(loss_sum, name="epoch_loss", op=hvd.Sum)
        # per-rank speed measured on the rank's own compute (forward + backward), not the wait in
        # the allreduce, so a straggler stands out instead of slowing every rank's number equally
        mine = torch.tensor(
            [[rank, steps_done * bs / max(compute_s, 1e-9), 1000 * compute_s / max(steps_done, 1), peak_rss_mb()]],
            dtype=torch.float64,
        )
        per_rank = hvd.allgather(mine, name="rank_speed")
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=float(totals[0] / totals[1]) if totals[1] > 0 else math.nan,
            lr=learning_rate(tc, size, (epoch + 1) * self.opt_steps - 1, self.opt_steps),
            epoch_time_s=wall,
            samples_per_s=float(totals[1]) / wall if wall > 0 else 0.0,
            world_size=size,
            per_rank=[
                RankThroughput(
                    rank=int(r),
                    host=self.hosts[int(r)],
                    samples_per_s=float(s),
                    step_time_ms=float(t),
                    peak_rss_mb=float(m),
                )
                for r, s, t, m in per_rank.tolist()
            ],
            diverged=diverged_step is not None,
            diverged_step=diverged_step,
        )
        if diverged_step is not None or self.final is not None:
            return record  # a final fit has no validation rows: its epoch records have no val_*
        return EpochRecord.model_validate(
            {**record.model_dump(), **{f"val_{k}": v for k, v in self.validate().items()}}
        )

    def validate(self) -> dict[str, float]:
        hvd = self.hvd
        logits = torch.from_numpy(predict_logits(self.scored_net, self.val.x_num.numpy(), self.val.x_cat.numpy()))
        both = hvd.allgather(torch.stack([logits, self.val.y.double()], dim=1), name="val_pred")
        p = 1.0 / (1.0 + np.exp(-both[:, 0].numpy()))
        if not np.all(np.isfinite(p)):
            return {"roc_auc": math.nan, "log_loss": math.nan}
        y = both[:, 1].numpy()
        # The decision threshold is chosen here, on validation rows, with the model of this epoch:
        # the best epoch's threshold is saved with the best weights (delays are a minority class,
        # so 0.5 can predict "no delay" for every row).
        threshold = max_f1_threshold(y, p)
        m = classification_metrics(y, p, threshold)
        return {
            **{k: m[k] for k in METRIC_NAMES},
            "decision_threshold": threshold,
        }


# --------------------------------------------------------------------------- checkpoints


def checkpoint_payload(
    progress: Progress,
    net: TabularNet,
    opt: HorovodOptimizer,
    cfg: PipelineConfig,
    size: int,
    average: WeightAverage | None = None,
) -> CheckpointPayload:
    return CheckpointPayload(
        **progress.as_checkpoint(),
        model=net.state_dict(),
        optimizer=opt.state_dict(),
        arch=net.arch,
        world_size=size,
        seed=cfg.training.seed,
        # a resumed run goes on averaging from here
        averaged=average.state_dict() if average is not None else None,
    )


def find_resume_point(args: argparse.Namespace, cfg: PipelineConfig) -> Path | None:
    """--resume: the newest checkpoint in this run's own directory; otherwise
    ``training.resume_from`` (a checkpoint dir/file or an earlier run id) when set."""
    own = latest_checkpoint(Path(args.output_dir) / CHECKPOINT_DIR) if args.resume else None
    if own is not None:
        return own
    if cfg.training.resume_from and not getattr(args, "final_fit_epochs", None):
        # (a final fit starts fresh: training.resume_from is where its first run started)
        return resolve_checkpoint(cfg.training.resume_from, get_settings().runs_dir)
    return None


# --------------------------------------------------------------------------- outputs


def write_outputs(
    out: Path,
    trainer: Trainer,
    progress: Progress,
    outcome: Outcome,
    cfg: PipelineConfig,
    size: int,
    started: float,
    run_log: RunLogger,
    resumed_from: str | None = None,
) -> TrainingSummary:
    """Best model + preprocessor + summary.json (rank 0)."""
    net = trainer.scored_net  # without a best epoch (a final fit): the last (averaged) weights
    status = outcome.status
    model_written = False
    history = progress.history
    best_rec = next((h for h in history if h.epoch == progress.best_epoch), history[-1] if history else None)
    threshold = best_rec.val_decision_threshold if best_rec else None  # of the weights saved below
    if trainer.final is not None:
        # the final model has seen the validation rows: it keeps the first run's threshold
        threshold = trainer.final.decision_threshold
    if progress.best_model is not None:
        best = TabularNet(**net.arch)
        best.load_state_dict(progress.best_model)
        save_model(out, best, trainer.pre, cfg.training.model, decision_threshold=threshold)
        model_written = True
    elif status != "diverged":
        save_model(out, net, trainer.pre, cfg.training.model, decision_threshold=threshold)
        model_written = True
    ranks = sorted({r.rank for h in history for r in h.per_rank})
    host_of = {x.rank: x.host for h in history for x in h.per_rank}
    per_rank = [
        RankThroughput(
            rank=r,
            host=host_of.get(r),
            samples_per_s=float(np.mean([x.samples_per_s for h in history for x in h.per_rank if x.rank == r])),
            step_time_ms=float(np.mean([x.step_time_ms for h in history for x in h.per_rank if x.rank == r])),
            peak_rss_mb=max((x.peak_rss_mb or 0.0) for h in history for x in h.per_rank if x.rank == r),
        )
        for r in ranks
    ]
    last_ckpt = latest_checkpoint(out / CHECKPOINT_DIR)
    metrics = {k: _finite(v) for k, v in best_rec.val_metrics().items()} if best_rec else {}
    if history:
        metrics["train_loss"] = _finite(history[-1].train_loss)
        metrics["samples_per_s"] = float(np.mean([h.samples_per_s for h in history]))
    summary = TrainingSummary(
        status=status,
        epochs=progress.epoch,
        epochs_planned=trainer.epochs,
        best_epoch=progress.best_epoch or None,
        best_val_roc_auc=_finite(progress.best_auc),
        metrics=metrics,
        per_rank=per_rank,
        hosts=sorted({h for h in host_of.values() if h}),
        world_size=size,
        model_written=model_written,
        checkpoint_dir=str(out / CHECKPOINT_DIR) if last_ckpt else None,
        last_good_checkpoint=str(last_ckpt) if last_ckpt else None,
        diverged_at=outcome.diverged_at,
        resumed_from=resumed_from,
        horovod=cfg.training.horovod,
        elastic=cfg.training.elastic.enabled,
        seed=cfg.training.seed,
        wall_time_s=time.time() - started,
        history=list(history),
    )
    summary.write(out)
    run_log.tag(tags.TRAINING_STATUS, status)
    if summary.hosts:
        run_log.tag(tags.HOSTS, ",".join(summary.hosts))
    if best_rec:
        run_log.metrics(
            {f"best_{k}": v for k, v in metrics.items() if k.startswith("val_") and v is not None},
            step=progress.best_epoch or 0,
        )
    run_log.flush()  # everything rank 0 logged is in MLflow before the launcher reads the run
    return summary


def epoch_metrics(record: EpochRecord) -> dict[str, float | None]:
    m: dict[str, float | None] = {
        k: float(v)
        for k, v in record.model_dump().items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "diverged_step")
    }
    for r in record.per_rank:
        m[f"rank{r.rank}_samples_per_s"] = r.samples_per_s
        m[f"rank{r.rank}_step_time_ms"] = r.step_time_ms
        m[f"rank{r.rank}_peak_rss_mb"] = r.peak_rss_mb
    return m


# --------------------------------------------------------------------------- drivers


def pin_to_cores(local_rank: int, local_size: int, threads: int) -> None:
    """Give this rank ``threads`` cores of its own when the host has enough for every rank;
    otherwise leave scheduling to the OS (pinning would stack ranks on the same cores)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if local_size * threads > len(cores):
        return
    mine = set(cores[local_rank * threads : (local_rank + 1) * threads])
    os.sched_setaffinity(0, mine)
    # Every thread that exists yet (Horovod's background and Gloo threads) follows.
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:
            pass


def read_config(raw: str) -> PipelineConfig:
    """``--config-json``: the config as JSON, or ``@path`` to a JSON file."""
    if raw.startswith("@"):
        raw = Path(raw[1:]).read_text()
    return PipelineConfig.model_validate_json(raw)


def ranks_sharing_host(cfg: PipelineConfig, local_size: int) -> int:
    """The ranks that share this machine's cores. Horovod's local size counts the ranks under one
    host name, but a one-host elastic job splits its slots over two names of this machine
    (``launch.one_host_elastic_slots``): there every rank of the job is local, up to max_np.
    Counted as 1 there, every rank started a thread per core of the machine: epochs of 7 s
    instead of 0.6 s on the smoke slice (2 cores, np=2), with the same results."""
    tc = cfg.training
    if tc.elastic.enabled and not tc.horovod.hosts:
        return tc.elastic.max_np or tc.world_size
    return local_size


def _setup(args: argparse.Namespace, cfg: PipelineConfig) -> tuple[ModuleType, Manifest, Path]:
    import horovod.torch as hvd

    hvd.init()
    cores = usable_cores()
    # ranks on one host share its cores: without this each rank starts cores threads
    threads = cfg.training.threads_per_rank or max(1, cores // ranks_sharing_host(cfg, hvd.local_size()))
    # Not under elastic: ranks come and go and change local rank, and a pinned process could
    # not widen its affinity again.
    if cfg.training.pin_ranks and not cfg.training.elastic.enabled:
        pin_to_cores(hvd.local_rank(), hvd.local_size(), threads)
    torch.set_num_threads(threads)
    manifest = Manifest.load(args.manifest)
    out = Path(args.output_dir)
    (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    return hvd, manifest, out


def train(state: TrainingState, trainer: Trainer, out: Path, run_log: RunLogger) -> Outcome:
    """The epoch loop, once for both drivers: from ``state.progress`` to the planned epochs, early
    stopping or divergence. ``state`` has Horovod's state shape (``training/state.py``).

    Under ``hvd.elastic.run`` this function is entered again after every reset, with the state
    rolled back to its last commit and rank and size possibly changed; they cannot change within
    one call. Rank 0 logs an epoch's metrics and writes its checkpoint after all of the epoch's
    collectives succeeded and before the commit, so a rollback never replays a logged epoch
    (unless rank 0 itself is lost between the two).
    """
    hvd, cfg, tc = trainer.hvd, trainer.cfg, trainer.tc
    trainer.prepare()
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        run_log.params(flat_params(cfg, size, trainer.manifest, trainer.final))  # kept from the first start
        log(
            f"training{' (final fit: train + validation rows)' if trainer.final else ''}: world_size={size} "
            f"rows/rank~{len(trainer.data)} batch/rank={trainer.batch} "
            f"steps/epoch={trainer.steps} threads/rank={torch.get_num_threads()}"
        )
    # A final fit runs its k epochs whatever happens to a validation AUC it does not have.
    patience = tc.early_stopping_patience if trainer.final is None else trainer.epochs + 1
    while state.progress.epoch < trainer.epochs and not state.progress.stopped:
        record = trainer.train_epoch(state.progress.epoch)
        if record.diverged_step is not None:
            if rank == 0:
                log(f"epoch {record.epoch}: non-finite loss at step {record.diverged_step}: diverged, stopping")
                run_log.metrics({"diverged": 1.0}, step=record.epoch)
            return Outcome("diverged", DivergedAt(epoch=record.epoch, step=record.diverged_step))
        state.progress = state.progress.after_epoch(record, trainer.scored_net, patience)
        if rank == 0:
            payload = checkpoint_payload(state.progress, trainer.net, trainer.opt, cfg, size, trainer.average)
            save_checkpoint(out / CHECKPOINT_DIR, payload)
            run_log.metrics(epoch_metrics(record), step=record.epoch)
            val = "" if trainer.final else f"val_auc={record.val_roc_auc:.4f} val_logloss={record.val_log_loss:.4f} "
            log(
                f"epoch {record.epoch}/{trainer.epochs} (size {size}): train_loss={record.train_loss:.4f} "
                f"{val}{record.samples_per_s:.0f} samples/s ({record.epoch_time_s:.2f}s)"
            )
        state.commit()
    return Outcome("early_stopped" if state.progress.stopped else "completed")


def run_fixed(
    args: argparse.Namespace, trainer: Trainer, out: Path, run_log: RunLogger
) -> tuple[Outcome, Progress, Path | None]:
    """A fixed-size job: the loop runs once; a failed job ends, and its retry resumes from the checkpoint.

    Rank 0 reads the resume checkpoint (it may live only on its disk) and sends it to every rank:
    every rank restores it before the sync, because Horovod's broadcast of an empty optimizer
    state first takes a step of its own, which would move the weights of a fresh rank only.
    """
    hvd = trainer.hvd
    ckpt_info: tuple[Path, CheckpointPayload] | None = None
    if hvd.rank() == 0:
        point = find_resume_point(args, trainer.cfg)
        if point is not None:
            ckpt_info = (point, load_checkpoint(point))
    ckpt_info = hvd.broadcast_object(ckpt_info, root_rank=0, name="checkpoint")
    point, progress = None, Progress()
    if ckpt_info is not None:
        point, progress = ckpt_info[0], restore(ckpt_info[1], trainer.net, trainer.opt, ckpt_info[0], trainer.average)
        if hvd.rank() == 0:
            log(f"resuming from {point} after epoch {progress.epoch}")
    averaged = trainer.average.model if trainer.average is not None else None
    state = FixedState(hvd, trainer.net, trainer.opt, progress, averaged)
    state.sync()
    return train(state, trainer, out, run_log), state.progress, point


def run_elastic(
    args: argparse.Namespace, trainer: Trainer, out: Path, run_log: RunLogger
) -> tuple[Outcome, Progress, Path | None]:
    """``hvd.elastic.run``: the state is committed every epoch; a lost worker rolls back to the commit.

    No collective runs before the elastic function (Horovod's rule), so every rank reads the
    resume checkpoint from disk itself (one host or a shared filesystem) and the state's sync
    broadcasts rank 0's copy.
    """
    hvd = trainer.hvd
    point = find_resume_point(args, trainer.cfg)
    progress = Progress()
    if point is not None:
        progress = restore(load_checkpoint(point), trainer.net, trainer.opt, point, trainer.average)
        log(f"resuming from {point} after epoch {progress.epoch}")
    # the average is an nn.Module: TorchState saves, rolls back and syncs it like the model
    extra = {"averaged": trainer.average.model} if trainer.average is not None else {}
    state = hvd.elastic.TorchState(model=trainer.net, optimizer=trainer.opt, progress=progress, **extra)
    state.register_reset_callbacks([lambda: log(f"elastic reset: now rank {hvd.rank()} of {hvd.size()}")])
    outcome = hvd.elastic.run(train)(state, trainer, out, run_log)
    return outcome, state.progress, point


def run(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    started = time.time()
    hvd, manifest, out = _setup(args, cfg)
    final = FinalFit(args.final_fit_epochs, args.decision_threshold) if args.final_fit_epochs else None
    trainer = Trainer(hvd, cfg, manifest, final)
    run_log = RunLogger()  # one per process, across elastic resets
    drive = run_elastic if cfg.training.elastic.enabled else run_fixed
    try:
        outcome, progress, resumed_from = drive(args, trainer, out, run_log)
    except BaseException:
        with contextlib.suppress(Exception):
            run_log.flush()  # what rank 0 logged before the failure still reaches MLflow
        raise
    if hvd.rank() == 0:
        summary = write_outputs(
            out,
            trainer,
            progress,
            outcome,
            cfg,
            hvd.size(),
            started,
            run_log,
            resumed_from=str(resumed_from) if resumed_from else None,
        )
        log(
            f"done: status={outcome.status} epochs={summary.epochs} best_epoch={summary.best_epoch} "
            f"best_val_auc={summary.best_val_roc_auc}"
        )
    hvd.barrier()  # nobody exits (and tears down Gloo) while rank 0 is still writing
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ringflow.training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="manifest.json (or its directory) written by the sharding stage")
    p.add_argument("--config-json", required=True, help="PipelineConfig as JSON, or @path to a JSON file")
    p.add_argument("--output-dir", required=True, help="where model.pt, summary.json and checkpoints/ go")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument(
        FINAL_EPOCHS_ARG,
        dest="final_fit_epochs",
        type=int,
        default=None,
        help="a final fit: train on the train and validation rows for this many epochs, without validation",
    )
    p.add_argument(
        THRESHOLD_ARG,
        dest="decision_threshold",
        type=float,
        default=None,
        help="the final fit's decision threshold (the first run's, chosen on validation)",
    )
    return p.parse_args(argv)


# Errors a second attempt would meet again: the rank says so (FATAL_PREFIX line, FATAL_EXIT) and
# the launcher reports this reason instead of a peer's "Horovod has been shut down", and does not retry.
FATAL_ERRORS = (
    ShardIntegrityError,
    MissingKeyError,
    SecretsFileError,
    CheckpointError,
    ValidationError,
    FileNotFoundError,
    NoShardError,
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_logs()  # MLflow's monitor start/stop lines in every run's log
    try:
        load_secrets()  # the data key and credentials, from the launcher's 0600 file (never argv)
        cfg = read_config(args.config_json)
        with host_system_metrics():  # CPU/memory/network of this host in the run (local rank 0)
            return run(args, cfg)
    except FATAL_ERRORS as e:
        reason = str(e).replace("\n", " ")
        print(f"{FATAL_PREFIX}{type(e).__name__}: {reason}", file=sys.stderr, flush=True)
        return FATAL_EXIT


if __name__ == "__main__":
    from ringflow.training.process_exit import exit_fast

    exit_fast(main())  # horovodrun waits for every rank's exit: skip the interpreter's teardown
