"""Rank 0's side of a prefix-cache hit: prefetch while a request queues, admit it when it pays.

    arrival     arrived(seq)   -> look the prompt up; its SSD blocks start prefetching here, and
                                  the ids ride along in the next plan so every rank reads them
    scheduling  held(seq)      -> True while waiting for the reads beats prefilling (cost.py)
    admission   admitted(seq)  -> the sequence with the blocks to restore now

Queue time is free time: under load a request's blocks are read while it waits for a batch
slot. On an idle server a request is held back only while the cost model expects its reads to
finish sooner than prefilling those blocks would, and never inside an engine step: the batch
keeps running, and requests behind a held one are admitted past it.

Workers read the same blocks from their own disks, starting one plan after rank 0, and a
restore uses only what every rank has in memory. So once rank 0's own reads are done it holds
the request a little longer, as long again as its reads took (at most WORKER_GRACE_S), for the
workers to finish theirs. On one rank there is nobody to wait for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mlx_cluster.engine.plan import NewSequence

WORKER_GRACE_S = 0.5


@dataclass
class _Pending:
    ids: list[bytes]  # the ids of the prompt's restorable blocks
    since: float
    reading: bool  # some of its blocks come from SSD: it may be worth holding
    held: bool = False
    read_at: float | None = None  # when rank 0's own reads were done (workers get as long again)


class RestorePlanner:
    def __init__(self, cache, clock: Callable[[], float] = time.monotonic, world_size: int = 1):
        self.cache = cache
        self.clock = clock
        self.world_size = world_size
        self._pending: dict[int, _Pending] = {}  # seq id -> its lookup, while it waits
        self._hints: list[bytes] = []  # SSD block ids for the next plan's prefetch list

    def arrived(self, seq: NewSequence) -> None:
        ids = self.cache.block_ids(seq.prompt, seq.adapter)
        if ids:
            on_disk = self.cache.lookup(ids)
            self._pending[seq.seq_id] = _Pending(ids, self.clock(), bool(on_disk))
            self._hints.extend(on_disk)

    def held(self, seq: NewSequence) -> bool:
        """Whether to keep `seq` waiting this step for blocks still being read from SSD."""
        pending = self._pending.get(seq.seq_id)
        if pending is None or not pending.reading:
            return False
        decision = self.cache.decide(pending.ids)
        now = self.clock()
        if decision.wait_s and now - pending.since < decision.wait_s:
            return self._hold(pending)
        if not decision.reading and self.world_size > 1:
            # Rank 0's reads are done: give the workers, who started one plan later, as long again.
            if pending.read_at is None:
                pending.read_at = now
            if now < pending.read_at + min(WORKER_GRACE_S, pending.read_at - pending.since):
                return True
        pending.reading = False  # done, or not worth it: decided once and for all
        return False

    def _hold(self, pending: _Pending) -> bool:
        if not pending.held:
            pending.held = True
            self.cache.count_held()
        return True

    def admitted(self, seq: NewSequence) -> NewSequence:
        pending = self._pending.pop(seq.seq_id, None)
        if pending is None:
            return seq
        return self.cache.plan_sequence(seq, pending.ids)

    def forget(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)

    def take_hints(self) -> tuple[bytes, ...]:
        """Block ids every rank should start reading (once each), for the next plan."""
        hints, self._hints = tuple(self._hints), []
        return hints

    @property
    def waiting_for_reads(self) -> bool:
        return any(p.reading for p in self._pending.values())
