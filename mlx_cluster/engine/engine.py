"""The engine loop, identical on every rank.

    step() = schedule (rank 0) -> publish/receive the plan -> execute -> emit (rank 0)

Rank 0 owns a `Frontend` (requests and scheduling); the other ranks have none and simply run
what the plan says. Identical plans and seeds give identical tokens; a running digest of the
sampled tokens rides along in every plan, so a rank that diverges fails loudly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mlx_cluster.engine.executor import Executor
from mlx_cluster.engine.frontend import Frontend
from mlx_cluster.engine.memory import IdleReclaimer
from mlx_cluster.engine.plan import StepPlan
from mlx_cluster.engine.trace import StepTrace

log = logging.getLogger(__name__)

# Phases that wait on other ranks (the plan link, restore agreement, the model's all_sums):
# the watchdog ends the rank when one of them runs past collective_timeout_s.
# A model load ("load", several models only) reads weights for as long as it takes, like start-up.
WATCHED_PHASES = frozenset({"bus", "apply", "model"})


class DivergenceError(RuntimeError):
    """This rank sampled different tokens than rank 0: the ranks are no longer in lock-step."""


@dataclass
class StepTimer:
    """When the current bus exchange or model step began (0 when none runs); the watchdog reads it."""

    busy_since: float = 0.0
    phase: str = "idle"
    last_step_s: float = 0.0


class Engine:
    def __init__(
        self,
        executor: Executor,
        bus,
        frontend: Frontend | None,
        heartbeat_s: float,
        trace: StepTrace | None = None,
        reclaim_idle: bool = True,
    ):
        self.executor = executor
        self.bus = bus
        self.frontend = frontend
        self.heartbeat_s = heartbeat_s
        self.timer = StepTimer()
        self.step_index = 0
        self.idle = True
        self.trace = trace
        self._phases: list[tuple[str, float]] = []
        # Seconds spent in each phase since start (idle included): read by the status reporter.
        self.phase_s: dict[str, float] = {}
        self.last_phase_s: dict[str, float] = {}  # the latest duration of each phase
        self.last_work_s = 0.0
        self._phase_at = time.perf_counter()
        self.models = None  # engine/models.py ModelSet when several models are served
        # Freed memory goes back to the OS once the batch is idle (engine/memory.py).
        self.reclaimer = IdleReclaimer() if reclaim_idle else None

    def step(self) -> StepPlan:
        started = time.perf_counter()
        self._phase("plan")
        plan = None
        if self.frontend is not None and self.models is not None:
            plan, lane = self.models.next_plan(self.step_index)  # the lane that runs, and its plan
            self.frontend = lane.frontend
        elif self.frontend is not None:
            plan = self.frontend.next_plan(self.step_index, self.executor.digest)
        self._phase("bus")
        plan = self.bus.exchange(plan)
        if self.models is not None:
            if plan.model_ops:
                self._phase("load")
            self.executor = self.models.apply(plan)  # loads and unloads first, then this step's model
        if plan.digest != self.executor.digest:
            raise DivergenceError(
                f"step {plan.step}: token digest {self.executor.digest:#x} differs from rank 0's {plan.digest:#x}"
            )
        self._phase("apply")
        self.executor.apply(plan)
        if plan.adapters and self.frontend is not None:
            self.frontend.adapters_applied(self.executor.adapter_results)
        self._phase("model")
        outputs = self.executor.step()
        self._phase("emit")
        if self.frontend is not None:
            self.frontend.emit(outputs)
        self._end_step(plan, len(outputs), started)
        return plan

    def _phase(self, name: str) -> None:
        """Enter a phase: the watchdog watches those that wait on peers; the trace records all."""
        self._account_phase()
        self.timer.phase = name
        self.timer.busy_since = time.monotonic() if name in WATCHED_PHASES else 0.0
        if self.trace is not None:
            self._phases.append((name, time.perf_counter()))

    def _account_phase(self) -> None:
        now = time.perf_counter()
        phase = self.timer.phase
        self.last_phase_s[phase] = now - self._phase_at
        self.phase_s[phase] = self.phase_s.get(phase, 0.0) + now - self._phase_at
        self._phase_at = now

    def _end_step(self, plan: StepPlan, tokens: int, started: float) -> None:
        self._account_phase()
        self.timer.phase = "idle"
        self.timer.busy_since = 0.0
        now = time.perf_counter()
        if self.trace is not None:
            args = {"batch": self.executor.active, "tokens": tokens, "new": len(plan.new), "drop": len(plan.drop)}
            self.trace.step(plan.step, self._phases, now, args)
            self._phases = []
        self.timer.last_step_s = now - started
        self.last_work_s = self.timer.last_step_s - self.last_phase_s.get("bus", 0.0)  # without the plan wait
        self.step_index = plan.step + 1
        self.idle = plan.idle
        if self.reclaimer is not None:
            self.reclaimer.after_step(plan.idle)  # every rank runs the same plans: all reclaim together

    def run(self) -> None:
        """Loop until a shutdown plan has been executed."""
        while True:
            if self.frontend is not None and self.idle:
                # Idle: sleep until work arrives, but publish at least one plan per heartbeat
                # so a dead or wedged worker is noticed even when nobody sends requests.
                self.frontend.wait_for_work(self.heartbeat_s)
            plan = self.step()
            if plan.shutdown:
                log.info("shutdown plan executed at step %d", plan.step)
                if self.trace is not None:
                    self.trace.flush()
                return
