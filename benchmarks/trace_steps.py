"""Summarize an engine trace (`MLX_CLUSTER_TRACE`, engine/trace.py) by kind of step.

Steps that admit new sequences (prefill) and steps that only decode are told apart, and the
decode steps are grouped by batch size: how many, their median and mean time, and the mean of
each phase. This splits a served benchmark's TPOT into the step time itself and the prefill
steps that land between tokens.

    python3 benchmarks/trace_steps.py /tmp/trace.rank0.json [more.json ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def summarize(path: str) -> dict:
    events = json.load(open(path))["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("step ")]
    phases = sorted(
        (e for e in events if e.get("ph") == "X" and not e["name"].startswith("step ")), key=lambda e: e["ts"]
    )
    by_step = defaultdict(dict)
    i = 0
    for s in sorted(steps, key=lambda e: e["ts"]):  # each step's phases lie inside its span
        end = s["ts"] + s["dur"]
        while i < len(phases) and phases[i]["ts"] < end:
            if phases[i]["ts"] >= s["ts"]:
                by_step[s["ts"]][phases[i]["name"]] = phases[i]["dur"]
            i += 1
    groups = defaultdict(list)
    for s in steps:
        a = s.get("args", {})
        if a.get("batch", 0) == 0 and a.get("tokens", 0) == 0:
            continue  # idle heartbeats
        kind = "admit" if a.get("new") else f"decode b{a.get('batch')}"
        groups[kind].append(s)
    out = {}
    for kind, ss in sorted(groups.items(), key=lambda kv: -sum(s["dur"] for s in kv[1])):
        durs = [s["dur"] / 1e3 for s in ss]
        names = {n for s in ss for n in by_step[s["ts"]]}
        out[kind] = {
            "steps": len(ss),
            "total_ms": round(sum(durs), 1),
            "median_ms": round(statistics.median(durs), 3),
            "mean_ms": round(statistics.mean(durs), 3),
            "phase_mean_ms": {
                n: round(statistics.mean(by_step[s["ts"]].get(n, 0) for s in ss) / 1e3, 3) for n in sorted(names)
            },
        }
    return out


def main() -> None:
    for path in sys.argv[1:]:
        print(path)
        for kind, row in summarize(path).items():
            print(
                f"  {kind:>12}: {row['steps']:5d} steps, {row['total_ms']:9.1f} ms, median {row['median_ms']:.2f} "
                f"mean {row['mean_ms']:.2f}  phases {row['phase_mean_ms']}"
            )


if __name__ == "__main__":
    main()
