"""The engine's step trace (engine/trace.py) and benchmarks/trace_steps.py, which splits a served
run's steps into admissions and decode steps by batch size (docs/benchmarks.md reads TPOT gaps
with it): every step is counted once, in its kind, with its own phases."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from trace_steps import summarize  # noqa: E402

from mlx_cluster.engine.trace import StepTrace  # noqa: E402


def record(trace: StepTrace, step: int, start: float, model_s: float, **args) -> float:
    """One step of plan (1 ms), model (model_s) and emit (1 ms) from `start`; returns its end."""
    phases = [("plan", start), ("model", start + 0.001), ("emit", start + 0.001 + model_s)]
    end = start + 0.002 + model_s
    trace.step(step, phases, end, args)
    return end


def test_steps_are_split_into_admissions_and_decode_steps_by_batch(tmp_path):
    trace = StepTrace(str(tmp_path / "t"), rank=0)
    t = trace._t0
    t = record(trace, 0, t, 0.0, batch=0, tokens=0, new=0, drop=0)  # an idle heartbeat: not counted
    t = record(trace, 1, t, 0.100, batch=2, tokens=2, new=2, drop=0)  # prefill of two requests
    for i, model_s in enumerate((0.010, 0.012, 0.020)):
        t = record(trace, 2 + i, t, model_s, batch=2, tokens=2, new=0, drop=0)
    t = record(trace, 5, t, 0.008, batch=1, tokens=1, new=0, drop=1)
    trace.flush()

    summary = summarize(trace.path)

    assert set(summary) == {"admit", "decode b2", "decode b1"}
    assert summary["admit"]["steps"] == 1
    assert abs(summary["admit"]["phase_mean_ms"]["model"] - 100) < 0.5
    b2 = summary["decode b2"]
    assert b2["steps"] == 3
    assert abs(b2["median_ms"] - 14) < 0.5  # 12 ms of model + 2 ms of plan and emit
    assert abs(b2["phase_mean_ms"]["model"] - 14) < 0.5 and abs(b2["phase_mean_ms"]["plan"] - 1) < 0.1
    assert list(summary)[0] == "admit"  # kinds come largest total first
