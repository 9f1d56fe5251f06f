"""Weight averaging (``training.ema_decay``): an exponential moving average of the weights.

Small networks trained with a decaying learning rate end each epoch at a point that still
jitters from batch to batch; the average of the last few hundred steps' weights sits nearer the
middle of the basin and often generalises a little better (Polyak averaging; Izmailov et al.
2018). This is torch's own :class:`~torch.optim.swa_utils.AveragedModel`: the first update copies
the weights, every later one moves the average ``1 - d`` of the way towards them, with the decay
warmed up as TensorFlow's ``ExponentialMovingAverage(num_updates=)`` does it:
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates. Without the warm-up the average of a
12-epoch run (52 steps an epoch on the flights default) stays tied to the initial weights for epochs: with decay
0.99 the first epoch's averaged weights scored May ROC AUC 0.47-0.60 (network_trials.md).
Buffers are averaged too (the network has none today; a BatchNorm added later would need it).

Every rank keeps its own average with no communication: Horovod's allreduced step leaves the
ranks' weights identical, so their averages stay identical too. The averaged module is an
``nn.Module``, so Horovod's elastic ``TorchState`` saves, restores and syncs it like the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch.optim.swa_utils import AveragedModel

from ringflow.training.model import TabularNet


def ema_update(decay: float) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor | int], None]:
    """``AveragedModel``'s ``multi_avg_fn``: the EMA step with the warmed-up decay."""

    @torch.no_grad()
    def update(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], updates: torch.Tensor | int) -> None:
        n = float(updates)
        d = min(decay, (1.0 + n) / (10.0 + n))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:  # integer buffers (a counter) follow the model
                a.copy_(c)

    return update


class WeightAverage:
    """The EMA of ``net``'s weights; :meth:`update` after every optimizer step."""

    def __init__(self, net: TabularNet, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = AveragedModel(net, multi_avg_fn=ema_update(decay), use_buffers=True)
        """The averaged module (``net``'s copy in ``.module`` and the count ``n_averaged``)."""

    @property
    def net(self) -> TabularNet:
        """The averaged weights as a network: validate, checkpoint and export this one."""
        return cast(TabularNet, self.model.module)

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far (0: the average is still the initial weights)."""
        return int(self.model.n_averaged)

    def update(self, net: TabularNet) -> None:
        self.model.update_parameters(net)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights and the update count, as a checkpoint stores them."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def weight_average(net: TabularNet, decay: float | None) -> WeightAverage | None:
    """The average ``training.ema_decay`` asks for, or None when averaging is off."""
    return WeightAverage(net, decay) if decay is not None else None
