"""Where a Horovod step's time goes, read from a Horovod timeline (``HOROVOD_TIMELINE``).

The timeline is a Chrome trace with one "process" per tensor (``allreduce.mlp.0.weight``, ...) and
nested begin/end activities on it: ``NEGOTIATE_ALLREDUCE`` (from this rank's gradient being ready
until every rank has it ready: the rest of the backward pass plus any wait for a slower rank),
then ``ALLREDUCE`` (the collective itself: ``MEMCPY_IN_FUSION_BUFFER``, ``GLOO_ALLREDUCE``,
``MEMCPY_OUT_FUSION_BUFFER``). Gradients of several tensors are fused into one collective, so an
activity's time is the union of its intervals over all gradient tensors, per training step.
"""

from __future__ import annotations

import json
from pathlib import Path

ACTIVITIES = (
    "NEGOTIATE_ALLREDUCE",
    "ALLREDUCE",
    "GLOO_ALLREDUCE",
    "MEMCPY_IN_FUSION_BUFFER",
    "MEMCPY_OUT_FUSION_BUFFER",
)


def _events(path: Path) -> list[dict]:
    text = Path(path).read_text().strip()
    if not text.endswith("]"):  # Horovod leaves the array open while the job runs (or if killed)
        text = text.rstrip(",") + "]"
    return json.loads(text)


def _union_us(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def step_breakdown(path: Path) -> dict[str, float]:
    """Milliseconds per training step spent in each gradient-allreduce activity, and the step count.

    Steps = allreduces of the gradient tensor seen most often (every step reduces every gradient).
    """
    names: dict[int, str] = {}
    stacks: dict[int, list[tuple[str, int]]] = {}
    spans: dict[str, list[tuple[int, int]]] = {a: [] for a in ACTIVITIES}
    per_tensor: dict[int, int] = {}
    for ev in _events(path):
        pid, ph = ev.get("pid"), ev.get("ph")
        if ph == "M" and ev.get("name") == "process_name" and "name" in ev.get("args", {}):
            names[pid] = ev["args"]["name"]
        elif ph == "B":
            stacks.setdefault(pid, []).append((ev["name"], ev["ts"]))
        elif ph == "E" and stacks.get(pid):
            name, start = stacks[pid].pop()
            tensor = names.get(pid, "")
            # gradients only: not the epoch loss, the broadcasts or the validation gathers
            if not tensor.startswith("allreduce.") or tensor == "allreduce.epoch_loss":
                continue
            if name in spans:
                spans[name].append((start, ev["ts"]))
            if name == "ALLREDUCE":
                per_tensor[pid] = per_tensor.get(pid, 0) + 1
    steps = max(per_tensor.values(), default=0)
    out: dict[str, float] = {"steps": float(steps)}
    for name, iv in spans.items():
        out[f"{name.lower()}_ms"] = _union_us(iv) / 1000 / steps if steps else float("nan")
    return out
