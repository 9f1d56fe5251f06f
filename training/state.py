"""What the epoch loop carries from one epoch to the next, and the state objects it runs over.

:class:`Progress` is the bookkeeping of a training: epochs finished, the best epoch with its
weights and validation AUC, the early-stopping counter and the per-epoch history. It is what a
checkpoint stores (with the model and optimizer) and what an elastic commit saves.

The epoch loop (``training.train.train``) is written once against Horovod's state shape
(``horovod/common/elastic.py``): a state with ``model``, ``optimizer`` and ``progress``
attributes, ``sync()`` to agree on rank 0's copy and ``commit()`` after every epoch. Two objects
have that shape:

- elastic runs use Horovod's own ``hvd.elastic.TorchState(model=, optimizer=, progress=)``:
  ``commit()`` saves a copy to roll back to when a worker is lost, and ``hvd.elastic.run`` syncs
  it before every (re)start of the loop;
- fixed-size runs use :class:`FixedState`: the same ``sync()``, and a ``commit()`` with nothing to
  do, since a failed fixed-size job ends and resumes from its checkpoint instead.

``Progress`` is immutable: the loop replaces ``state.progress`` after each epoch instead of
changing it in place. Horovod's ``ObjectState.save`` keeps a reference, not a copy, so a progress
changed in place would also change the commit an elastic reset rolls back to.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from ringflow.training.averaging import WeightAverage
from ringflow.training.checkpoint import CheckpointError, CheckpointPayload, ProgressFields
from ringflow.training.model import TabularNet
from ringflow.training.summary import DivergedAt, EpochRecord, Status


@dataclass(frozen=True)
class Progress:
    """A training's bookkeeping after ``epoch`` finished epochs (identical on every rank)."""

    epoch: int = 0
    """Epochs finished (the next one to train is ``epoch``, 0-based)."""
    best_auc: float = -math.inf
    """Best validation ROC AUC so far."""
    best_epoch: int = 0
    """The epoch (1-based) of ``best_auc``; 0 before the first finished epoch."""
    bad_epochs: int = 0
    """Epochs since the last improvement (early stopping)."""
    best_model: dict[str, torch.Tensor] | None = None
    """The weights of ``best_epoch`` (early stopping ends with them)."""
    history: tuple[EpochRecord, ...] = ()
    """One record per finished epoch (``Trainer.train_epoch``)."""
    stopped: bool = False
    """Early stopping: ``bad_epochs`` reached the patience."""

    def after_epoch(self, record: EpochRecord, net: nn.Module, patience: int) -> Progress:
        """The progress once the epoch of ``record`` finished with the weights in ``net``."""
        auc = record.val_roc_auc
        history = (*self.history, record)
        if math.isfinite(auc) and auc > self.best_auc:
            return dataclasses.replace(
                self,
                epoch=record.epoch,
                history=history,
                best_auc=auc,
                best_epoch=record.epoch,
                bad_epochs=0,
                best_model={k: v.detach().clone() for k, v in net.state_dict().items()},
            )
        bad = self.bad_epochs + 1
        return dataclasses.replace(self, epoch=record.epoch, history=history, bad_epochs=bad, stopped=bad >= patience)

    def as_checkpoint(self) -> ProgressFields:
        """The fields as a checkpoint stores them (plain types: checkpoints load ``weights_only``)."""
        return ProgressFields(
            epoch=self.epoch,
            best_auc=self.best_auc,
            best_epoch=self.best_epoch,
            bad_epochs=self.bad_epochs,
            best_model=self.best_model,
            history=[r.model_dump() for r in self.history],
            stopped=self.stopped,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: ProgressFields) -> Progress:
        return cls(
            epoch=ckpt["epoch"],
            best_auc=ckpt["best_auc"],
            best_epoch=ckpt["best_epoch"],
            bad_epochs=ckpt["bad_epochs"],
            best_model=ckpt["best_model"],
            history=tuple(EpochRecord.model_validate(r) for r in ckpt["history"]),
            stopped=ckpt["stopped"],
        )


class HorovodOptimizer(Protocol):
    """What the loop and the states use of Horovod's ``DistributedOptimizer`` (a torch optimizer)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class TrainingState(Protocol):
    """Horovod's state shape, which both :class:`FixedState` and ``hvd.elastic.TorchState`` have."""

    progress: Progress

    def sync(self) -> None: ...

    def commit(self) -> None: ...


def restore(
    ckpt: CheckpointPayload,
    net: TabularNet,
    opt: HorovodOptimizer,
    source: Path,
    average: WeightAverage | None = None,
) -> Progress:
    """Load a checkpoint's model and optimizer state into ``net``/``opt`` (and its moving average
    of the weights into ``average``); its progress. A checkpoint written without averaging
    leaves ``average`` fresh: its first update copies the restored weights."""
    if ckpt.get("arch") != net.arch:
        raise CheckpointError(
            f"checkpoint {source} was trained with architecture {ckpt.get('arch')}, this run builds {net.arch} "
            "(different vocabulary or model config): start fresh or resume from a matching run"
        )
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    averaged = ckpt.get("averaged")
    if average is not None and averaged is not None:
        average.load_state_dict(averaged)
    return Progress.from_checkpoint(ckpt)


class FixedState:
    """The state of a fixed-size run: the attributes and ``sync()`` of Horovod's ``TorchState``,
    and a ``commit()`` with nothing to save (no worker can join or leave)."""

    def __init__(
        self,
        hvd: ModuleType,
        model: nn.Module,
        optimizer: HorovodOptimizer,
        progress: Progress,
        averaged: nn.Module | None = None,
    ):
        self.hvd = hvd
        self.model, self.optimizer, self.progress = model, optimizer, progress
        self.averaged = averaged
        """The moving average of the weights (``training.ema_decay``), synced like the model."""

    def sync(self) -> None:
        """Rank 0's weights, optimizer state, averaged weights and progress on every rank
        (``TorchState.sync``'s order)."""
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        if self.averaged is not None:
            self.hvd.broadcast_parameters(self.averaged.state_dict(), root_rank=0)
        self.progress = self.hvd.broadcast_object(self.progress, root_rank=0, name="progress")

    def commit(self) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    """How the epoch loop ended."""

    status: Status
    diverged_at: DivergedAt | None = None
    """The epoch (1-based) and the first step of the update not applied."""
