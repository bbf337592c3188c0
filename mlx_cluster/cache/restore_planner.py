"""Rank 0's side of a prefix-cache hit: prefetch while a request queues, admit it when it pays.

    arrival     arrived(seq)   -> look the prompt up; its SSD blocks start prefetching here, and
                                  the ids ride along in the next plan so every rank reads them
    scheduling  held(seq)      -> True while waiting for the reads beats prefilling (cost.py)
    admission   admitted(seq)  -> the sequence with the blocks to restore now

Queue time is free time: under load a request's blocks are read while it waits for a batch
slot. On an idle server a request is held back only while the cost model expects its reads to
finish sooner than prefilling those blocks would, and never inside an engine step: the batch
keeps running, and requests behind a held one are admitted past it.
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


class RestorePlanner:
    def __init__(self, cache, clock: Callable[[], float] = time.monotonic):
        self.cache = cache
        self.clock = clock
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
        wait_s = self.cache.decide(pending.ids).wait_s
        if not (wait_s and self.clock() - pending.since < wait_s):
            pending.reading = False  # done, or not worth it: decided once and for all
            return False
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
