"""What a verify step costs on this machine, in plain decode steps (engine/speculate.py decides by it).

A verify step costs more than a plain one: it is synchronous (it waits for the pending token
and for its own result), wider, and a draft model proposes first. That price differs by an
order of magnitude between machines, so every rank measures it at start-up
(`measure_verify_cost`) and the ranks agree on the largest figure over the control bus
(`Speculator.agree`). `speculative.verify_cost` in the config pins it instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlx_cluster.engine.speculate import Speculator


@dataclass(frozen=True)
class VerifyCost:
    """What a verify step costs in plain decode steps: `narrow` with one proposal, `wide` with
    `num_tokens` (K), linear in between. Measured at start-up (`measure_verify_cost`); until
    then (tests, in-process benchmarks) the H200 figure is assumed."""

    narrow: float = 1.6
    wide: float = 1.6
    num_tokens: int = 4

    def of(self, k: int) -> float:
        if self.num_tokens <= 1:
            return self.wide
        return self.narrow + (self.wide - self.narrow) * (k - 1) / (self.num_tokens - 1)

    def best_k(self, p: float, limit: int) -> int:
        """The number of proposals (1..limit) that gives the most expected tokens per unit of
        cost, or 0 when no number beats a plain step (one token per step)."""
        best, rate, expected = 0, 1.0, 1.0
        for k in range(1, limit + 1):
            expected += p**k  # y, then each proposal accepted while all before it were
            if expected / self.of(k) > rate:
                best, rate = k, expected / self.of(k)
        return best

    def permille(self) -> list[int]:
        return [round(1000 * self.narrow), round(1000 * self.wide)]


def measure_verify_cost(executor, speculator: Speculator) -> VerifyCost:
    """Time, on this rank, plain decode steps of a throwaway greedy sequence (pipelined, as
    served) against verify steps of it with one and with K proposals (the proposer's own time
    included), and return the ratios. Every rank runs the same steps in lock-step, as warm-up
    does: the forwards hold the model's collectives.

    The sequence runs twice and the second run counts. On an H200 a first run came out 4x too
    high (7.4 plain steps against 1.76 and 1.78 for the next two, `results/gpu-h200-2026-12-03`):
    each new cache length and width costs the device set-up work once, which a long-running
    server has long paid, and an untimed first round within one run did not cover it, since
    the sequence keeps growing into new lengths."""
    _time_verify(executor, speculator)
    return _time_verify(executor, speculator)


def _time_verify(executor, speculator: Speculator, token_id: int = 0, repeats: int = 6, rounds: int = 3) -> VerifyCost:
    """One run of measure_verify_cost. Each kind's time is the fastest of `rounds` interleaved
    blocks after an untimed one (it compiles), because on a shared host noise only ever adds
    time, and one unlucky block would otherwise set the rule for the server's whole life."""
    from mlx_cluster.engine.decode import DecodeBatch
    from mlx_cluster.engine.plan import NewSequence, SamplingParams, StepPlan

    seq_id = (1 << 63) - 1
    params = SamplingParams(max_tokens=1 << 16, seed=0, temperature=0.0)
    executor.apply(StepPlan(step=0, new=(NewSequence(seq_id=seq_id, prompt=(token_id,) * 32, params=params),)))
    batch = executor.generator._generation_batch
    try:
        for _ in range(4):  # the prefill, then the sequence joins the decode batch
            executor.step()
            if len(getattr(batch, "uids", ())) == 1:
                break
        if not isinstance(batch, DecodeBatch) or len(batch.uids) != 1:
            return speculator.cost  # pipeline stages run micro-batches, which never speculate
        uid, k_max = batch.uids[0], speculator.num_tokens

        def plain() -> None:
            batch.speculator = None
            executor.step()
            batch.speculator = speculator

        def verify(k: int) -> None:
            last = batch._next_tokens.tolist()
            speculator.proposer.propose([uid], [batch.tokens[0] + last], [k])  # timed, not used
            speculator.verify(batch, last, [[token_id] * k], account=False)

        kinds = {"plain": plain, 1: lambda: verify(1), k_max: lambda: verify(k_max)}
        best = {kind: float("inf") for kind in kinds}
        for r in range(1 + rounds):  # round 0 is not timed
            for kind, run in kinds.items():
                if kind == "plain":
                    run()  # a verify drained the pipeline: refill it before timing pipelined steps
                started = time.perf_counter()
                for _ in range(repeats):
                    run()
                # Wait for what the block queued, so that it counts here and not in the next block
                # (a device may run several pipelined steps behind the host).
                batch._next_tokens.tolist()
                if r:
                    best[kind] = min(best[kind], (time.perf_counter() - started) / repeats)
    finally:
        batch.speculator = speculator
        executor.apply(StepPlan(step=0, drop=(seq_id,)))
        speculator.proposer.forget(set())
        executor.digest = 0
    return VerifyCost(best[1] / best["plain"], best[k_max] / best["plain"], k_max)
