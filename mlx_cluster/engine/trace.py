"""Per-step engine trace in Chrome's trace-event format (open it in Perfetto or chrome://tracing).

    MLX_CLUSTER_TRACE=/tmp/trace mlx-cluster up cluster.yaml   ->  /tmp/trace.rank0.json, ...

Each engine step becomes spans for its phases (plan, bus, apply, model, emit) on the rank's
own track, with the batch size and tokens as arguments. "model" is host time: building the
next step's graph plus waiting for the current step's tokens; a step whose "model" span is
mostly waiting is device-bound, one whose other spans are long is host-bound. Events go to a
bounded buffer and are written when the engine stops (and every `flush_every` steps), so
tracing a long run costs memory only up to the bound.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque


class StepTrace:
    def __init__(self, path: str, rank: int, max_events: int = 500_000, flush_every: int = 2000):
        self.path = f"{path}.rank{rank}.json"
        self.rank = rank
        self.events: deque[dict] = deque(maxlen=max_events)
        self.flush_every = flush_every
        self._t0 = time.perf_counter()
        self._steps = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, rank: int) -> StepTrace | None:
        path = os.environ.get("MLX_CLUSTER_TRACE")
        return cls(path, rank) if path else None

    def step(self, step: int, phases: list[tuple[str, float]], end: float, args: dict) -> None:
        """One step: `phases` are (name, start perf_counter) in order; each ends where the next starts."""
        bounds = [t for _, t in phases] + [end]
        with self._lock:
            self.events.append(self._event(f"step {step}", bounds[0], end, args))
            for (name, start), stop in zip(phases, bounds[1:]):
                self.events.append(self._event(name, start, stop, None))
            self._steps += 1
        if self._steps % self.flush_every == 0:
            self.flush()

    def _event(self, name: str, start: float, stop: float, args: dict | None) -> dict:
        event = {
            "name": name,
            "ph": "X",
            "pid": self.rank,
            "tid": 0,
            "ts": round((start - self._t0) * 1e6, 1),
            "dur": round((stop - start) * 1e6, 1),
        }
        if args:
            event["args"] = args
        return event

    def flush(self) -> None:
        with self._lock:
            events = list(self.events)
        meta = {"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": [meta, *events], "displayTimeUnit": "ms"}, f)
        os.replace(tmp, self.path)
