"""Reference trainer: the same model, data, batch and optimizer with torch DistributedDataParallel.

    python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/_ddp_reference.py \\
        --manifest M --config-json J --out result.json [--loader dataloader]

Mirrors ``training/train.py``'s work per step so the two are comparable: each rank reads its
shards (``Manifest.shards_for_rank``), the same per-epoch row order (``epoch_order``), the same
``TabularNet``, AdamW, BCE loss, warm-up LR schedule and thread rule (cores // local ranks, or
``training.threads_per_rank``). Gradients are averaged by DDP's Gloo allreduce (one bucket: the
model is ~56 KB). Throughput = samples of all ranks / epoch wall time (validation excluded).

``--loader dataloader`` feeds the same rows through ``DataLoader(TensorDataset, batch_sampler)``
instead of indexing the in-memory tensors: the cost of a DataLoader on the critical path.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--manifest", required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loader", choices=["memory", "dataloader"], default="memory")
    args = p.parse_args()
    faulthandler.enable()  # a native abort (Gloo, c10d) prints where each Python thread was

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ringflow.training.config import PipelineConfig
    from ringflow.training.manifest import Manifest
    from ringflow.training.metrics import classification_metrics
    from ringflow.training.model import TabularNet, predict_logits
    from ringflow.training.train import epoch_order, learning_rate, load_frame

    raw = args.config_json
    cfg = PipelineConfig.model_validate_json(Path(raw[1:]).read_text() if raw.startswith("@") else raw)
    tc = cfg.training
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(tc.threads_per_rank or max(1, cores // local))

    manifest = Manifest.load(args.manifest)
    pre = manifest.read_preprocessor()
    data = load_frame(manifest, manifest.shards_for_rank(rank, size), pre)
    torch.manual_seed(tc.seed)
    net = TabularNet.for_preprocessor(pre, tc.model)
    model = DDP(net)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    rows = [0] * size
    dist.all_gather_object(rows, len(data))
    bs = tc.batch_size
    steps = max(math.ceil(r / bs) for r in rows)
    loader = None
    if args.loader == "dataloader":
        ds = torch.utils.data.TensorDataset(data.x_num, data.x_cat, data.y)

    history = []
    for epoch in range(tc.epochs):
        torch.manual_seed(tc.seed + epoch * 1000 + rank)
        order = torch.from_numpy(epoch_order(len(data), steps * bs, tc.seed, epoch, rank))
        if args.loader == "dataloader":
            batches = [order[i * bs : (i + 1) * bs].tolist() for i in range(steps)]
            loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=0)
            it = iter(loader)
        model.train()
        dist.barrier()
        t0 = time.perf_counter()
        loss_acc = torch.zeros((), dtype=torch.float64)
        for i in range(steps):
            if loader is not None:
                xn, xc, y = next(it)
            else:
                idx = order[i * bs : (i + 1) * bs]
                xn, xc, y = data.x_num[idx], data.x_cat[idx], data.y[idx]
            for g in opt.param_groups:
                g["lr"] = learning_rate(tc, size, epoch * steps + i, steps)
            loss = loss_fn(model(xn, xc), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_acc += loss.detach()
        dist.barrier()
        wall = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch + 1,
                "epoch_time_s": wall,
                "samples_per_s": steps * bs * size / wall,
                "train_loss": float(loss_acc) / steps,
            }
        )
    auc = None
    if rank == 0:
        val = load_frame(manifest, [manifest.validation], pre)
        logits = predict_logits(net, val.x_num.numpy(), val.x_cat.numpy())
        auc = classification_metrics(val.y.numpy(), 1 / (1 + np.exp(-logits)))["roc_auc"]
        Path(args.out).write_text(
            json.dumps(
                {
                    "history": history,
                    "val_roc_auc_last": auc,
                    "world_size": size,
                    "threads": torch.get_num_threads(),
                    "loader": args.loader,
                }
            )
        )
    dist.barrier()
    # DDP's reducer holds the process group: release it here rather than in the interpreter's
    # finalization, where Gloo has been reported to abort (torch PR 179291; not proven the cause
    # of the abort CI saw once)
    del model, opt
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
