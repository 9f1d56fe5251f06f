"""Where a pipeline run's seconds go: one record of stage timings, work vs overhead.

The tasks record the parts they spend time on (``with timed("train", "MLflow: lineage")``), the
flow adds what is left of each task run (Prefect's states, result persistence, logging), and the
caller (the CLI, ``benchmarks/bench_pipeline.py``) adds the Prefect API start and the flow-run
creation before the flow's body ran. The same :class:`StageTimings` feeds the CLI's end-of-run
table, the flow's summary artifact and the benchmark, so the three always agree.

``work`` is the computation a user asked for (sharding, the training epochs, scoring the models,
fitting the baseline); ``overhead`` is everything around it (Prefect, MLflow logging, model
(de)serialisation, rank start-up, plots). A part of a task submitted to run beside another
(the baseline beside the training) is ``concurrent``: shown, but not added to the totals, since
its seconds overlap the stage it ran beside (what the flow then still waited for is recorded where
it waited). Records are kept per flow run in this process: tasks of a flow run in its process
(Prefect's default task runner), so no record crosses a process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel

Kind = Literal["work", "overhead"]
STAGES = ("prefect", "shard", "train", "train-final", "baseline", "evaluate", "register")
"""In the table's order; ``train-final`` only with ``training.final_fit``."""
TASK_REST = "Prefect task run (states, results, logs)"
API_START = "Prefect API start + flow-run creation"
FLOW_FINISH = "Prefect flow-run finish (final state)"


class StageTiming(BaseModel):
    stage: str
    part: str
    kind: Kind
    seconds: float
    concurrent: bool = False
    """Ran beside another stage: shown, not added to the totals."""


class StageTimings(BaseModel):
    """The timed parts of one pipeline run, in the order they were recorded."""

    parts: list[StageTiming] = []
    flow_body_started: float | None = None
    """``time.time()`` when the flow's body started (after the Prefect API and the flow run were up)."""
    flow_body_ended: float | None = None
    call_started: float | None = None
    """``time.time()`` when the caller called the flow (set by :func:`begin_call`), if known."""

    def end_call(self, call_ended: float | None = None) -> None:
        """The flow call returned: add the Prefect flow-run finish (after the flow's body)."""
        if self.flow_body_ended is not None:
            self.add("prefect", FLOW_FINISH, (call_ended or time.time()) - self.flow_body_ended)
            self.flow_body_ended = None  # once

    def add(self, stage: str, part: str, seconds: float, kind: Kind = "overhead", concurrent: bool = False) -> None:
        self.parts.append(
            StageTiming(stage=stage, part=part, kind=kind, seconds=max(0.0, float(seconds)), concurrent=concurrent)
        )

    def stage_seconds(self, stage: str) -> float:
        return sum(p.seconds for p in self.parts if p.stage == stage)

    def total(self, kind: Kind | None = None) -> float:
        """Seconds on the flow's critical path (``concurrent`` parts left out), of ``kind`` or all."""
        return sum(p.seconds for p in self.parts if not p.concurrent and (kind is None or p.kind == kind))

    def rows(self) -> list[tuple[str, str, str, float]]:
        """(stage, part, kind, seconds), parts of the same name summed, in stage order; the kind of
        a concurrent part reads ``work, beside`` / ``overhead, beside``."""
        merged: dict[tuple[str, str, str], float] = {}
        for p in self.parts:
            kind = f"{p.kind}, beside" if p.concurrent else p.kind
            merged[(p.stage, p.part, kind)] = merged.get((p.stage, p.part, kind), 0.0) + p.seconds
        order = {s: i for i, s in enumerate(STAGES)}
        keys = sorted(merged, key=lambda k: order.get(k[0], len(order)))  # stable: recording order within a stage
        return [(s, part, kind, merged[(s, part, kind)]) for s, part, kind in keys]

    def markdown(self) -> str:
        if not self.parts:
            return "_no stage timings recorded (cached or retried stages)_\n"
        lines = ["| stage | part | kind | s |", "|---|---|---|---|"]
        lines += [f"| {s} | {part} | {kind} | {sec:.2f} |" for s, part, kind, sec in self.rows()]
        work, total = self.total("work"), self.total()
        lines.append(f"| **all** | work {work:.2f} s, overhead {total - work:.2f} s | | **{total:.2f}** |")
        if any(p.concurrent for p in self.parts):
            lines.append("\n_beside_: ran beside the training, so not added to the total.")
        return "\n".join(lines) + "\n"

    def text_lines(self) -> list[str]:
        rows = self.rows()
        if not rows:
            return []
        width = max(len(f"{s}: {part}") for s, part, _, _ in rows)
        kw = max(8, *(len(kind) for _, _, kind, _ in rows))
        out = [f"{f'{s}: {part}':<{width}}  {kind:<{kw}}  {sec:6.2f}s" for s, part, kind, sec in rows]
        work, total = self.total("work"), self.total()
        share = (total - work) / total if total else 0.0
        beside = (
            " ; 'beside' parts ran beside the training, not in the total"
            if any(p.concurrent for p in self.parts)
            else ""
        )
        out.append(f"{'total':<{width}}  {'':<{kw}}  {total:6.2f}s  (work {work:.2f}s, overhead {share:.0%}{beside})")
        return out


# --------------------------------------------------------------------------- the recorder

_lock = threading.Lock()
_records: dict[str, StageTimings] = {}
_call_started: float | None = None


def _flow_run_key() -> str:
    from prefect import runtime

    return str(runtime.flow_run.id or "no-flow-run")


def current() -> StageTimings:
    """The record of the flow run this code runs in (one outside any flow run)."""
    key = _flow_run_key()
    with _lock:
        return _records.setdefault(key, StageTimings())


def pop_current() -> StageTimings:
    """Take the flow run's record out of the recorder (the flow does at its end)."""
    key = _flow_run_key()
    with _lock:
        return _records.pop(key, None) or StageTimings()


def record(stage: str, part: str, seconds: float, kind: Kind = "overhead", concurrent: bool = False) -> None:
    current().add(stage, part, seconds, kind, concurrent)


@contextmanager
def timed(stage: str, part: str, kind: Kind = "overhead") -> Iterator[None]:
    """Record the block's wall time as ``part`` of ``stage`` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record(stage, part, time.perf_counter() - t0, kind)


class Laps:
    """A stopwatch for a straight run of code: each ``lap(part)`` records the time since the last
    lap (or the start) as ``part`` of ``stage``; one line between the steps, no re-indented code."""

    def __init__(self, stage: str, concurrent: bool = False) -> None:
        self.stage = stage
        self.concurrent = concurrent
        self.last = time.perf_counter()

    def __call__(self, part: str, kind: Kind = "overhead") -> None:
        now = time.perf_counter()
        record(self.stage, part, now - self.last, kind, self.concurrent)
        self.last = now


def begin_call() -> None:
    """The caller is about to call the flow: the flow counts the Prefect API start and the
    flow-run creation from here (the CLI and the benchmark call it; a deployment run has no such
    moment in its process and leaves it out)."""
    global _call_started
    _call_started = time.time()


def start_flow_body() -> StageTimings:
    """Called first thing in the flow's body: notes the start and the time since :func:`begin_call`."""
    global _call_started
    t = current()
    t.flow_body_started = time.time()
    if _call_started is not None and t.flow_body_started - _call_started < 600:
        t.call_started = _call_started
        t.add("prefect", API_START, t.flow_body_started - _call_started)
    _call_started = None
    return t
