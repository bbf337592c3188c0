"""Rank 0's side of a prefix-cache hit: prefetch while a request queues, admit it when it pays.

    arrival     arrived(seq)      -> look the prompt up; its SSD blocks start prefetching here
    publishing  take_hints(step)  -> their ids ride in plan `step`, so every rank reads them
    scheduling  held(seq)         -> True while waiting for the reads beats prefilling (cost.py)
    admission   admitted(seq)     -> the sequence with the blocks to restore now

Queue time is free time: under load a request's blocks are read while it waits for a batch
slot. On an idle server a request is held back only while the cost model expects its reads to
finish sooner than prefilling those blocks would, and never inside an engine step: the batch
keeps running, and requests behind a held one are admitted past it.

Several ranks: each worker reads the same blocks from its own disk, starting when plan `step`
reaches it, and tells rank 0 over the status link as soon as the reads of every plan up to
`step` are done (`workers_read_through`, the lowest step every worker has reported). Until
every worker has reported the request's step, its SSD blocks count as still being read, even
those rank 0 already holds: the request stays held under the same cost bound as rank 0's own
reads, and if that bound runs out first it is admitted with only the blocks every rank surely
has (the RAM tier, the same on every rank), the rest prefilled. A read that failed on a worker
or a staged block dropped meanwhile is still caught by the restore's agreement on what every
rank has in memory (prefix_cache.py), so the ranks never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mlx_cluster.engine.plan import NewSequence


@dataclass
class _Pending:
    ids: list[bytes]  # the ids of the prompt's restorable blocks
    since: float
    reading: bool  # some of its blocks come from SSD: it may be worth holding
    held: bool = False
    hint_step: int | None = None  # the plan that asked every rank to read its SSD blocks


class RestorePlanner:
    def __init__(
        self,
        cache,
        clock: Callable[[], float] = time.monotonic,
        world_size: int = 1,
        workers_read_through: Callable[[], int] | None = None,
    ):
        """`workers_read_through()`: the highest plan step whose prefetch list every worker has
        finished reading (runtime/status_link.py StatusBoard.prefetched_through). Without it, on
        several ranks, SSD blocks are never planned: only RAM blocks are known to be everywhere."""
        self.cache = cache
        self.clock = clock
        self.world_size = world_size
        self.workers_read_through = workers_read_through
        self._pending: dict[int, _Pending] = {}  # seq id -> its lookup, while it waits
        self._hints: list[bytes] = []  # SSD block ids for the next plan's prefetch list
        self._unpublished: list[_Pending] = []  # lookups whose ids are in _hints

    def arrived(self, seq: NewSequence) -> None:
        ids = self.cache.block_ids(seq.prompt, seq.adapter)
        if ids:
            on_disk = self.cache.lookup(ids)
            pending = _Pending(ids, self.clock(), bool(on_disk))
            self._pending[seq.seq_id] = pending
            if on_disk:
                self._hints.extend(on_disk)
                self._unpublished.append(pending)

    def held(self, seq: NewSequence) -> bool:
        """Whether to keep `seq` waiting this step for blocks still being read from SSD."""
        pending = self._pending.get(seq.seq_id)
        if pending is None or not pending.reading:
            return False
        decision = self.cache.decide(pending.ids, self._everywhere(pending))
        if decision.wait_s and self.clock() - pending.since < decision.wait_s:
            if not pending.held:
                pending.held = True
                self.cache.count_held()
            return True
        pending.reading = False  # read everywhere, or not worth waiting for: decided once and for all
        return False

    def _everywhere(self, pending: _Pending) -> bool:
        """Whether every worker has reported the reads of this request's SSD blocks done."""
        if self.world_size == 1:
            return True
        if pending.hint_step is None or self.workers_read_through is None:
            return False
        return self.workers_read_through() >= pending.hint_step

    def admitted(self, seq: NewSequence) -> NewSequence:
        pending = self._pending.pop(seq.seq_id, None)
        if pending is None:
            return seq
        return self.cache.plan_sequence(seq, pending.ids, self._everywhere(pending))

    def forget(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)

    def take_hints(self, step: int = 0) -> tuple[bytes, ...]:
        """Block ids every rank should start reading (once each), for plan `step`."""
        for pending in self._unpublished:
            pending.hint_step = step
        hints, self._hints, self._unpublished = tuple(self._hints), [], []
        return hints

    @property
    def waiting_for_reads(self) -> bool:
        return any(p.reading for p in self._pending.values())
