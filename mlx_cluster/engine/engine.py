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
from mlx_cluster.engine.plan import StepPlan

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """This rank sampled different tokens than rank 0: the ranks are no longer in lock-step."""


@dataclass
class StepTimer:
    """When the current bus exchange or model step began (0 when none runs); the watchdog reads it."""

    busy_since: float = 0.0
    phase: str = "idle"
    last_step_s: float = 0.0


class Engine:
    def __init__(self, executor: Executor, bus, frontend: Frontend | None, heartbeat_s: float):
        self.executor = executor
        self.bus = bus
        self.frontend = frontend
        self.heartbeat_s = heartbeat_s
        self.timer = StepTimer()
        self.step_index = 0
        self.idle = True

    def step(self) -> StepPlan:
        plan = None
        if self.frontend is not None:
            plan = self.frontend.next_plan(self.step_index, self.executor.digest)
        t0 = self._busy("bus")
        plan = self.bus.exchange(plan)
        if plan.digest != self.executor.digest:
            raise DivergenceError(
                f"step {plan.step}: token digest {self.executor.digest:#x} differs from rank 0's {plan.digest:#x}"
            )
        self.executor.apply(plan)
        self._busy("model")
        outputs = self.executor.step()
        self.timer.busy_since = 0.0
        self.timer.phase = "idle"
        self.timer.last_step_s = time.monotonic() - t0
        if self.frontend is not None:
            self.frontend.emit(outputs)
        self.step_index = plan.step + 1
        self.idle = plan.idle
        return plan

    def _busy(self, phase: str) -> float:
        now = time.monotonic()
        self.timer.phase = phase
        self.timer.busy_since = now
        return now

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
                return
