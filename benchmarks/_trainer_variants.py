"""The project's trainer (``training/train.py``) with benchmark-only variations, chosen by env.

    horovodrun ... python benchmarks/_trainer_variants.py --manifest M --config-json J --output-dir D

- ``RFBENCH_PIN=1``: pin each rank to one core (``os.sched_setaffinity(0, {local_rank})``) before
  torch starts its threads (the effect of ``taskset -c <rank>``).
- ``RFBENCH_FAST=1``: the per-step prototype fix for ``Trainer.train_epoch``:
  1. no extra blocking ``hvd.allreduce`` per step to agree on a non-finite loss. A non-finite
     loss on any rank makes the *averaged* gradient non-finite on every rank, so all ranks see
     the same verdict after the gradient allreduce they do anyway
     (``opt.synchronize()`` -> check -> ``with opt.skip_synchronize(): opt.step()``); the bad
     step is still not applied and every rank still stops at the same step;
  2. the epoch loss is summed as a tensor (no ``loss.item()`` + ``torch.tensor`` per step).
  Everything else (data order, LR schedule, logging, outputs) is the original code.

Nothing here changes ``training/train.py``; it patches the class in this process only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pin() -> None:
    local_rank = int(os.environ.get("HOROVOD_LOCAL_RANK", "0"))
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[local_rank % len(cores)]})


def fast_train_epoch(self, epoch: int) -> dict[str, Any]:
    import torch

    from training.train import epoch_order, epoch_seed, learning_rate

    hvd, tc = self.hvd, self.tc
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(epoch_seed(tc.seed, epoch, rank) + 1)
    bs = self.batch[rank]
    order = torch.from_numpy(epoch_order(len(self.data), self.steps * bs, tc.seed, epoch, rank))
    k = tc.horovod.backward_passes_per_step
    params = [p for g in self.opt.param_groups for p in g["params"]]
    self.net.train()
    self.opt.zero_grad()
    loss_acc = torch.zeros((), dtype=torch.float64)
    compute_s = 0.0
    diverged_step = None
    t_epoch = time.perf_counter()
    for i in range(self.steps):
        t0 = time.perf_counter()
        idx = order[i * bs:(i + 1) * bs]
        logits = self.net(self.data.x_num[idx], self.data.x_cat[idx])
        loss = self.loss_fn(logits, self.data.y[idx])
        (loss * self.loss_weight / k).backward()
        compute_s += time.perf_counter() - t0
        loss_acc += loss.detach()
        if (i + 1) % k == 0 or i + 1 == self.steps:
            self.opt.synchronize()  # the gradient allreduce (it also carries any rank's NaN/inf)
            if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                diverged_step = i
                break
            lr = learning_rate(tc, size, epoch * self.opt_steps + i // k, self.opt_steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            with self.opt.skip_synchronize():
                self.opt.step()
            self.opt.zero_grad()
    wall = time.perf_counter() - t_epoch
    steps_done = diverged_step if diverged_step is not None else self.steps
    loss_sum = torch.stack([loss_acc * bs, torch.tensor(float(steps_done * bs), dtype=torch.float64),
                            torch.zeros((), dtype=torch.float64)])
    totals = hvd.allreduce(loss_sum, name="epoch_loss", op=hvd.Sum)
    mine = torch.tensor([[rank, steps_done * bs / max(compute_s, 1e-9), 1000 * compute_s / max(steps_done, 1)]],
                        dtype=torch.float64)
    per_rank = hvd.allgather(mine, name="rank_speed")
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": float(totals[0] / totals[1]) if totals[1] > 0 else math.nan,
        "lr": learning_rate(tc, size, (epoch + 1) * self.opt_steps - 1, self.opt_steps),
        "epoch_time_s": wall,
        "samples_per_s": float(totals[1]) / wall if wall > 0 else 0.0,
        "world_size": size,
        "per_rank": [{"rank": int(r), "samples_per_s": float(s), "step_time_ms": float(t)}
                     for r, s, t in per_rank.tolist()],
        "diverged": diverged_step is not None,
    }
    if diverged_step is not None:
        record["diverged_step"] = diverged_step
        return record
    record.update({f"val_{k}": v for k, v in self.validate().items()})
    return record


def main() -> int:
    if os.environ.get("RFBENCH_PIN") == "1":
        _pin()
    import training.train as tt

    if os.environ.get("RFBENCH_FAST") == "1":
        tt.Trainer.train_epoch = fast_train_epoch
    return tt.main()


if __name__ == "__main__":
    sys.exit(main())
