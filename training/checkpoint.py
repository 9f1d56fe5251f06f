"""Per-epoch training checkpoints: written atomically by rank 0, resumed by every rank.

A checkpoint holds everything needed to continue bit-for-bit: model and optimizer state, the
number of finished epochs, the best model so far with its validation AUC, the early-stopping
counter and the metrics history. RNG state is not stored because the training loop reseeds
every RNG from (seed, epoch, rank) at the start of each epoch, so the data order and dropout
masks of epoch k do not depend on what ran before.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import torch

from ringflow.training.manifest import atomic_write_bytes
from ringflow.training.model import Arch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")
KEEP = 3
"""Newest checkpoints kept on disk (the best model travels inside each checkpoint)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model being trained."""


class ProgressFields(TypedDict):
    """The training's bookkeeping (``training.state.Progress``) as a checkpoint stores it: plain
    types and tensors only, since checkpoints load ``weights_only``."""

    epoch: int
    """Epochs finished."""
    best_auc: float
    best_epoch: int
    bad_epochs: int
    best_model: dict[str, torch.Tensor] | None
    history: list[dict[str, Any]]
    """One ``training.summary.EpochRecord.model_dump()`` per finished epoch (validated on load)."""
    stopped: bool


class CheckpointPayload(ProgressFields):
    """``epoch-NNNN.pt``: the progress, the model and optimizer state and what they fit."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    """Horovod's DistributedOptimizer ``state_dict()`` (a torch optimizer's)."""
    arch: Arch
    world_size: int
    seed: int
    averaged: NotRequired[dict[str, torch.Tensor] | None]
    """With ``training.ema_decay``: the moving average of the weights (``training.averaging``),
    which the progress's ``best_model`` was taken from; ``model`` holds the trained weights.
    None without averaging; absent in checkpoints written before it existed."""


# (with postponed annotations Python 3.11 cannot see NotRequired: it lists every key as required)
_REQUIRED = CheckpointPayload.__required_keys__ - {"averaged"}


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (by epoch number, not mtime)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: str | Path, state: CheckpointPayload, keep: int = KEEP) -> Path:
    """Write ``epoch-NNNN.pt`` (``state["epoch"]`` = epochs finished) atomically, prune old ones."""
    d = Path(directory)
    path = checkpoint_path(d, int(state["epoch"]))
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> CheckpointPayload:
    p = Path(path)
    try:
        # weights_only: a checkpoint is data; never unpickle arbitrary objects from disk.
        raw: object = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from None
    missing = sorted(_REQUIRED - set(raw)) if isinstance(raw, dict) else ["(not a dict)"]
    if missing:
        raise CheckpointError(f"{p} is not a ringflow checkpoint: it lacks {', '.join(missing)}")
    # the keys are checked above; the history is validated by Progress.from_checkpoint
    return cast(CheckpointPayload, raw)


def resolve_checkpoint(ref: str | Path, runs_dir: Path | None = None) -> Path:
    """A checkpoint file from ``training.resume_from``: a checkpoint file, a directory holding
    checkpoints (or a run output dir with ``checkpoints/``), or an MLflow run id whose output
    directory is ``runs_dir/<run id>``."""
    candidates = [Path(ref)]
    if runs_dir is not None and not Path(ref).is_absolute():
        candidates.append(Path(runs_dir) / str(ref))
    for c in candidates:
        if c.is_file():
            return c
        for d in (c, c / CHECKPOINT_DIR):
            latest = latest_checkpoint(d)
            if latest is not None:
                return latest
    raise CheckpointError(
        f"training.resume_from={ref!r}: no checkpoint found (looked for epoch-NNNN.pt in "
        f"{', '.join(str(c) for c in candidates)} and their {CHECKPOINT_DIR}/)"
    )
