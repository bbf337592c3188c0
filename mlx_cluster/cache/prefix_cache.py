"""Automatic prefix caching across the cluster: what the engine calls, and when.

    rank 0, admission   plan_sequence(seq)   -> which leading blocks to restore (read-only lookups)
    every rank, apply   pinned(new)          -> those RAM blocks survive this step's drops
                        restore_batch(new)   -> one bus round agrees on what every rank can restore
    every rank, step    on_prompt_done(...)  -> store the prompt's blocks once it is prefilled
                        on_sequence_done(...)-> store prompt + generated blocks when it ends
                        clear()              -> when the plan says so (POST /admin/cache/clear)

The RAM tier is a mirror: every rank stores, touches and evicts the same ids in the same order
(each its own KV shard), because all of it follows the plan. SSD tiers may differ (a dropped
write, a wiped disk), which is why a restore first agrees on the count every rank can load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_cluster.cache.blocks import Block, BlockCodec
from mlx_cluster.cache.hashing import Namespace, block_hashes, restorable_blocks
from mlx_cluster.cache.ram import RamStats, RamTier
from mlx_cluster.cache.ssd import SsdStats, SsdTier
from mlx_cluster.engine.plan import NewSequence

log = logging.getLogger(__name__)

GB = 1_000_000_000  # cache.ram_gb and cache.ssd.max_gb are decimal gigabytes


@dataclass
class CacheStats:
    """A snapshot of one rank's prefix cache (server/admin.py and metrics.py read it)."""

    rank: int
    namespace: str
    block_size: int
    kv_bits: int | None
    policy: str
    restores: int = 0  # sequences that restored at least one block
    restored_tokens: int = 0
    agreements: int = 0  # restore agreements run (one bus round each)
    shortfall_blocks: int = 0  # planned by rank 0 but not restorable on every rank
    stored_blocks: int = 0
    ram: RamStats = field(default_factory=RamStats)
    ssd: SsdStats | None = None
    ssd_quant_bytes_saved: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ram"]["quant_bytes_saved"] = self.ram.quant_bytes_saved
        if d["ssd"] is not None:
            d["ssd"]["quant_bytes_saved"] = self.ssd_quant_bytes_saved
        del d["ssd_quant_bytes_saved"]
        return d


def kv_dtype(model) -> str:
    """The model's activation dtype, which its KV cache uses: the first floating parameter's."""
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    return "float32"


def supports_prefix_cache(model) -> bool:
    """Only plain per-layer KVCaches can be cut into blocks (no rotating, SSM or chunked caches)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


class PrefixCache:
    def __init__(
        self,
        config,
        *,
        fingerprint: str,
        dtype: str,
        group=None,
        ssd_queue_size: int = 4096,
        live=None,
    ):
        """`config` is a CacheSection; `group` the model's group (its rank and size name the shard);
        `live` the live cache's quantization (an engine.kv_quant.LiveKV), which restores produce.

        Set `agree_min` to the control bus's agreement before restoring on several ranks.
        """
        self.rank = group.rank() if group is not None else 0
        self.world_size = group.size() if group is not None else 1
        self.agree_min = list  # one rank agrees with itself; rank.py plugs in ControlBus.agree_min
        self.block_size = config.block_size
        self.live = live
        self.namespace = Namespace(
            fingerprint,
            self.world_size,
            dtype,
            config.kv_bits,
            config.kv_group_size,
            config.block_size,
            live_kv_bits=live.bits if live is not None else None,
        )
        self.codec = BlockCodec(config.block_size, config.kv_bits, config.kv_group_size)
        self.ram = RamTier(int(config.ram_gb * GB))
        self.write_through = config.ssd.policy == "write_through"
        self.ssd = None
        if config.ssd.enabled and config.ssd.max_gb > 0:
            self.ssd = SsdTier(
                config.ssd.dir,
                fingerprint=fingerprint,
                tp_size=self.world_size,
                rank=self.rank,
                metadata={**self.namespace.fields(), "rank": str(self.rank)},
                max_bytes=int(config.ssd.max_gb * GB),
                ttl_s=config.ssd.ttl_days * 86400,
                max_pending_writes=ssd_queue_size,
            )
        self._stats = CacheStats(
            self.rank, self.namespace.digest.hex(), config.block_size, config.kv_bits, config.ssd.policy
        )
        self._raw_per_stored = 1.0  # measured on the first block: how much quantization shrinks one
        self._closed = False

    # ---- rank 0: planning (read-only) ----------------------------------------------------
    def plan_sequence(self, seq: NewSequence) -> NewSequence:
        """Fill `restore_blocks` with the longest chain of leading blocks rank 0 has (RAM or SSD)."""
        ids = block_hashes(self.namespace, seq.prompt, restorable_blocks(len(seq.prompt), self.block_size))
        n = 0
        while n < len(ids) and self._has(ids[n]):
            n += 1
        return dataclasses.replace(seq, restore_blocks=tuple(ids[:n]))

    def _has(self, block_id: bytes) -> bool:
        return self.ram.contains(block_id) or (self.ssd is not None and self.ssd.contains(block_id))

    def cached_tokens(self, seq: NewSequence) -> int:
        """Tokens rank 0 plans to restore (the executor reports what was actually restored)."""
        return len(seq.restore_blocks) * self.block_size

    def cached_prefix_tokens(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` are cached now, counting full blocks (read-only)."""
        n = 0
        for block_id in block_hashes(self.namespace, prompt):
            if not self._has(block_id):
                break
            n += 1
        return n * self.block_size

    # ---- every rank: restore ---------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, seqs: Sequence[NewSequence]):
        """Keep the RAM blocks these sequences will restore from being evicted meanwhile."""
        ids = [b for s in seqs for b in s.restore_blocks]
        self.ram.pin(ids)
        try:
            yield
        finally:
            self.ram.unpin(ids)

    def restore_batch(self, seqs: Sequence[NewSequence]) -> list[tuple[list[KVCache], int] | None]:
        """For each sequence, its restored per-layer cache and token count, or None.

        Each rank loads the planned blocks it has; then, if any sequence planned a restore, one
        agreement over the control bus gives every rank the same minimum, and each restores exactly
        that many blocks (prefilling the rest), so the ranks' caches stay in step.
        """
        loaded = [self._load_leading(s.restore_blocks) for s in seqs]
        if any(s.restore_blocks for s in seqs):
            counts = self.agree_min([len(blocks) for blocks in loaded])
            self._stats.agreements += 1
        else:
            counts = [0] * len(seqs)
        out = []
        for seq, blocks, n in zip(seqs, loaded, counts):
            self._stats.shortfall_blocks += len(seq.restore_blocks) - n
            if n == 0:
                out.append(None)
                continue
            used = blocks[:n]
            # Promote SSD-loaded blocks: the same set on every rank, since RAM is mirrored.
            self._store_chain([b for b, _, _ in used], {i: blk for i, (_, blk, ram) in enumerate(used) if not ram})
            self.ram.stats.hits += sum(1 for _, _, from_ram in used if from_ram)
            self.ram.stats.misses += sum(1 for _, _, from_ram in used if not from_ram)
            self._stats.restores += 1
            self._stats.restored_tokens += n * self.block_size
            out.append((self.codec.decode([b for _, b, _ in used], self.live), n * self.block_size))
        return out

    def _load_leading(self, ids: Sequence[bytes]) -> list[tuple[bytes, Block, bool]]:
        """The leading blocks of `ids` this rank can load: (id, block, came from RAM)."""
        out = []
        expected = {"n_tokens": str(self.block_size)}
        for block_id in ids:
            block = self.ram.peek(block_id)
            from_ram = block is not None
            if block is None and self.ssd is not None:
                block = self.ssd.read(block_id, expected)
            if block is None:
                break
            out.append((block_id, block, from_ram))
        return out

    # ---- every rank: store ------------------------------------------------------------------
    def on_prompt_done(self, seq: NewSequence, prompt_cache, tokens: Sequence[int]) -> None:
        """The prompt is prefilled: store its blocks now, so concurrent requests can share them."""
        self._store(prompt_cache, tokens)

    def on_sequence_done(self, seq: NewSequence, prompt_cache, all_tokens: Sequence[int]) -> None:
        """A sequence finished or was dropped: store its prompt and generated blocks."""
        self._store(prompt_cache, all_tokens)

    def _store(self, caches, tokens: Sequence[int]) -> None:
        if not caches or caches[0].keys is None:
            return
        n_tokens = min(len(tokens), caches[0].offset)
        ids = block_hashes(self.namespace, tokens[:n_tokens])
        first = 0
        while first < len(ids) and self.ram.contains(ids[first]):
            first += 1
        missing = [i for i in range(first, len(ids)) if not self.ram.contains(ids[i])]
        if not missing:
            return
        blocks = self.codec.encode(caches, first, len(ids) - first)
        self._raw_per_stored = blocks[0].raw_nbytes / max(1, blocks[0].nbytes)
        new = {i: blocks[i - first] for i in missing}
        self._store_chain(ids, new)
        if self.write_through and self.ssd is not None:
            for i, block in new.items():
                self.ssd.write(ids[i], block)
        self._stats.stored_blocks += len(new)

    def _store_chain(self, ids: Sequence[bytes], new: dict[int, Block]) -> None:
        """Put a chain's new blocks (by index) into RAM, then mark the chain used, head last.

        A block is only useful after its ancestors, so the chain is pinned while it is stored
        (a tail never evicts its own head), and the head ends up most recent, so under pressure
        a chain loses its tail first. What does not fit goes to the SSD tier.
        """
        self.ram.pin(ids)
        try:
            for i in sorted(new):
                for evicted_id, evicted in self.ram.put(ids[i], new[i]):
                    if self.ssd is not None:
                        self.ssd.write(evicted_id, evicted)  # write_back: what leaves RAM goes to disk
        finally:
            self.ram.unpin(ids)
        for block_id in reversed(ids):
            self.ram.touch(block_id)

    # ---- admin ------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every block in RAM and on this rank's SSD (every rank runs it at the same step)."""
        self.ram.clear()
        if self.ssd is not None:
            self.ssd.clear()
        log.info("prefix cache cleared on rank %d", self.rank)

    def stats(self) -> CacheStats:
        s = dataclasses.replace(self._stats, ram=dataclasses.replace(self.ram.stats))
        if self.ssd is not None:
            s.ssd = dataclasses.replace(self.ssd.stats)
            s.ssd_quant_bytes_saved = int(s.ssd.bytes * (1 - 1 / self._raw_per_stored))
        return s

    def usage(self) -> float:
        """Fraction of the RAM tier's byte budget in use (0-1)."""
        cap = self.ram.capacity_bytes
        return self.ram.stats.bytes / cap if cap else 0.0

    def close(self, flush: bool = True, timeout_s: float = 10.0) -> None:
        """On a clean shutdown, write RAM blocks to SSD (so a restart finds them), then stop the writer."""
        if self.ssd is None or self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        if flush:
            for block_id, block in reversed(self.ram.items()):  # most recently used first
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.ssd.write(block_id, block, wait_s=remaining)
        self.ssd.close(max(0.0, deadline - time.monotonic()))
