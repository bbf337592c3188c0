"""The RAM tier: blocks in memory under a byte budget, least recently used evicted first.

Every rank holds the same block ids in the same LRU order, because every mutation here
(store, touch on restore, evict, pin) is driven by the step plan, which all ranks execute
identically. Blocks each rank stores are its own KV shard, so byte counts match too.
Read-only queries (`contains`, `peek`) never reorder, so rank 0 may plan with them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from mlx_cluster.cache.blocks import Block


@dataclass
class RamStats:
    """Counters of the RAM tier (blocks and bytes are current, the rest cumulative)."""

    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    raw_bytes: int = 0  # what the stored blocks would take unquantized
    pinned_blocks: int = 0
    hits: int = 0  # blocks restored from this tier
    misses: int = 0  # blocks looked up at restore and not found here
    stores: int = 0
    evictions: int = 0
    rejected: int = 0  # blocks that did not fit even after evicting everything unpinned

    @property
    def quant_bytes_saved(self) -> int:
        return self.raw_bytes - self.bytes


class RamTier:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # oldest first
        self._pins: dict[bytes, int] = {}
        self._pinned_bytes = 0  # bytes of pinned blocks present here
        self.stats = RamStats(capacity_bytes=capacity_bytes)

    def __len__(self) -> int:
        return len(self._blocks)

    def contains(self, block_id: bytes) -> bool:
        """Read-only membership test (no LRU update)."""
        return block_id in self._blocks

    def peek(self, block_id: bytes) -> Block | None:
        """The block without touching the LRU order."""
        return self._blocks.get(block_id)

    def items(self) -> list[tuple[bytes, Block]]:
        """A snapshot of (id, block), least recently used first."""
        return list(self._blocks.items())

    def touch(self, block_id: bytes) -> None:
        """Mark a block as just used (it moves to the back of the eviction line)."""
        if block_id in self._blocks:
            self._blocks.move_to_end(block_id)

    def put(self, block_id: bytes, block: Block) -> list[tuple[bytes, Block]]:
        """Store a block, evicting LRU unpinned blocks to make room; returns what left the tier.

        A block that cannot fit (bigger than the budget, or the rest is pinned) is returned
        itself, so the caller can still hand it to the SSD tier.
        """
        if block_id in self._blocks:
            self._blocks.move_to_end(block_id)
            return []
        size = block.nbytes
        if size > self.capacity_bytes - self._pinned_bytes:
            self.stats.rejected += 1
            return [(block_id, block)]
        evicted = []
        while self.stats.bytes + size > self.capacity_bytes:
            victim = next(b for b in self._blocks if b not in self._pins)
            evicted.append((victim, self._remove(victim)))
            self.stats.evictions += 1
        self._blocks[block_id] = block
        self.stats.bytes += size
        if block_id in self._pins:
            self._pinned_bytes += size
        self.stats.raw_bytes += block.raw_nbytes
        self.stats.blocks = len(self._blocks)
        self.stats.stores += 1
        return evicted

    def _remove(self, block_id: bytes) -> Block:
        block = self._blocks.pop(block_id)
        self.stats.bytes -= block.nbytes
        self.stats.raw_bytes -= block.raw_nbytes
        self.stats.blocks = len(self._blocks)
        return block

    def pin(self, block_ids: Iterable[bytes]) -> None:
        """Protect blocks from eviction until `unpin` (reference counted). Ids not stored yet
        may be pinned too: they are protected from the moment they are stored."""
        for b in block_ids:
            n = self._pins.get(b, 0)
            self._pins[b] = n + 1
            if n == 0 and b in self._blocks:
                self._pinned_bytes += self._blocks[b].nbytes
        self.stats.pinned_blocks = len(self._pins)

    def unpin(self, block_ids: Iterable[bytes]) -> None:
        for b in block_ids:
            n = self._pins[b] - 1
            if n:
                self._pins[b] = n
            else:
                del self._pins[b]
                if b in self._blocks:
                    self._pinned_bytes -= self._blocks[b].nbytes
        self.stats.pinned_blocks = len(self._pins)

    def clear(self) -> None:
        """Drop every block (pins stay: they belong to a plan in flight)."""
        self._blocks.clear()
        self._pinned_bytes = 0
        self.stats.blocks = self.stats.bytes = self.stats.raw_bytes = 0
