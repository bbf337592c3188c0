"""Pure scheduling: from what is waiting and running, decide the next `StepPlan`.

No model, no threads, no clock: `schedule()` is a function of its inputs, which keeps it
unit-testable and makes every decision reproducible from the plan log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlx_cluster.engine.plan import FLAG_IDLE, FLAG_SHUTDOWN, NewSequence, StepPlan


@dataclass(frozen=True)
class SchedulerInput:
    step: int
    waiting: Sequence[NewSequence]  # in arrival order
    running: frozenset[int]  # seq ids in the batch
    drop: frozenset[int]  # seq ids to take out (aborted, or finished on a stop string)
    max_batch_size: int
    max_new_per_step: int
    digest: int = 0
    shutdown: bool = False
    kv_tokens_free: int | None = None  # None: unbounded


@dataclass(frozen=True)
class Decision:
    plan: StepPlan
    admitted: int  # how many of `waiting` (from the front) the plan admits


def schedule(state: SchedulerInput) -> Decision:
    """First come, first served, bounded by free batch slots and free KV tokens.

    Admission stops at the first request that does not fit, so a large request is not
    starved by a stream of small ones behind it.
    """
    drop = tuple(sorted(s for s in state.drop if s in state.running))
    running_after_drop = len(state.running) - len(drop)
    slots = max(0, min(state.max_batch_size - running_after_drop, state.max_new_per_step))
    budget = state.kv_tokens_free
    admitted = 0
    for seq in state.waiting[:slots]:
        need = len(seq.prompt) + seq.params.max_tokens
        if budget is not None:
            if need > budget and running_after_drop + admitted > 0:
                break
            budget -= need
        admitted += 1
    new = tuple(state.waiting[:admitted])
    flags = 0
    if state.shutdown:
        flags |= FLAG_SHUTDOWN
    elif running_after_drop + admitted == 0:
        flags |= FLAG_IDLE
    return Decision(StepPlan(step=state.step, new=new, drop=drop, flags=flags, digest=state.digest), admitted)
