"""Automatic prefix caching across the cluster: what the engine calls, and when.

    rank 0, arrival     block_ids(prompt)    -> the ids of the prompt's restorable blocks
                        lookup(ids)          -> the SSD ones of its cached chain start prefetching
    rank 0, scheduling  decide(ids)          -> restore how many, and whether to wait for reads (cost.py)
    rank 0, admission   plan_sequence(seq)   -> the leading blocks worth restoring now (decide's count)
    every rank, apply   prefetch(ids, step)  -> this rank's SSD reads start in the background; a
                                                worker calls on_prefetched(step) once they are done
                        pinned(new)          -> those RAM blocks survive this step's drops
                        restore_batch(new)   -> one bus round agrees on what every rank can restore
    every rank, step    on_prompt_done(...)  -> store the prompt's blocks once it is prefilled
                        on_sequence_done(...)-> store prompt + generated blocks when it ends
                        clear()              -> when the plan says so (POST /admin/cache/clear)

The RAM tier is a mirror: every rank stores, touches and evicts the same ids in the same order
(each its own KV shard), because all of it follows the plan. SSD tiers may differ (a dropped
write, a wiped disk, a slower disk), which is why rank 0 plans SSD blocks only once every
worker has reported its reads done (restore_planner.py), and a restore still first agrees on
the count every rank has in memory. No step ever waits for the disk: a restore adopts only
blocks in the RAM tier or already prefetched, and the rest of the prompt is prefilled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_cluster.cache.blocks import Block, BlockCodec, for_host
from mlx_cluster.cache.cost import CostModel, RestoreDecision
from mlx_cluster.cache.hashing import Namespace, adapter_root, block_hashes, restorable_blocks
from mlx_cluster.cache.ram import RamStats, RamTier
from mlx_cluster.cache.sizing import ram_tier_bytes, ssd_tier_bytes
from mlx_cluster.cache.ssd import SsdStats, SsdTier
from mlx_cluster.engine.plan import NewSequence

log = logging.getLogger(__name__)

REMEASURE_EVERY = 32  # while SSD reads lose to prefill, still read one lookup in this many


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
    held: int = 0  # requests rank 0 held back for their SSD prefetch (worth it by the cost model)
    recomputed_blocks: int = 0  # cached blocks prefilled anyway: restoring cost more, or their read was not done
    cost: dict = field(default_factory=dict)  # the cost model's current figures (cost.py)

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
        self.ram = RamTier(ram_tier_bytes(config.ram_gb))
        self.write_through = config.ssd.policy == "write_through"
        self.ssd = None
        ssd_bytes = ssd_tier_bytes(config.ssd.max_gb, config.ssd.dir) if config.ssd.enabled else 0
        if ssd_bytes > 0:
            self.ssd = SsdTier(
                config.ssd.dir,
                fingerprint=fingerprint,
                tp_size=self.world_size,
                rank=self.rank,
                metadata={**self.namespace.fields(), "rank": str(self.rank)},
                max_bytes=ssd_bytes,
                ttl_s=config.ssd.ttl_days * 86400,
                max_pending_writes=ssd_queue_size,
            )
        self._stats = CacheStats(
            self.rank, self.namespace.digest.hex(), config.block_size, config.kv_bits, config.ssd.policy
        )
        self.cost = CostModel(config.block_size)
        if self.ssd is not None:
            self.cost.ssd_read = self.ssd.read_cost
        self._raw_per_stored = 1.0  # measured on the first block: how much quantization shrinks one
        self._lookups = 0  # lookups that found SSD blocks (every REMEASURE_EVERY-th reads them anyway)
        self._closed = False
        self._adapter_roots: dict[int, bytes] = {}  # LoRA slot -> chain root (hashing.adapter_root)
        # A worker's "my reads of plan `step`'s prefetch list are done" (rank.py sends it to rank 0).
        self.on_prefetched = None
        if self.ssd is not None:
            self.ssd.on_reads_done = self._prefetched

    # ---- LoRA adapters: their blocks hash under their own root -----------------------------
    def set_adapter(self, slot: int, fingerprint: str | None) -> None:
        """Slot `slot` now runs the adapter with this content fingerprint (None: no adapter)."""
        if fingerprint is None:
            self._adapter_roots.pop(slot, None)
        else:
            self._adapter_roots[slot] = adapter_root(self.namespace, fingerprint)

    def _root(self, adapter: int) -> bytes | None:
        return self._adapter_roots.get(adapter) if adapter else None

    # ---- rank 0: planning (read-only, but lookups start SSD prefetches) ---------------------
    def block_ids(self, prompt: Sequence[int], adapter: int = 0) -> list[bytes]:
        """Ids of the prompt's blocks a restore could cover (the last token is always prefilled),
        under the LoRA adapter's own root; none for an adapter without one (never the base's)."""
        if adapter and adapter not in self._adapter_roots:
            return []
        max_blocks = restorable_blocks(len(prompt), self.block_size)
        return block_hashes(self.namespace, prompt, max_blocks, self._root(adapter))

    def lookup(self, ids: Sequence[bytes]) -> list[bytes]:
        """Of the leading blocks this rank has (RAM or SSD), those to read from the SSD tier;
        their reads start now, in the background. None are read when reading is measured to
        cost more than prefilling (the reads would only take CPU and disk from the engine),
        except now and then, to notice a disk that got faster (e.g. files now in page cache)."""
        on_disk = []
        for block_id in ids:
            if self.ram.contains(block_id):
                continue
            if self.ssd is None or not self.ssd.contains(block_id):
                break
            on_disk.append(block_id)
        if not on_disk:
            return []
        self._lookups += 1
        if self.cost.reads_pay() is False and self._lookups % REMEASURE_EVERY:
            return []
        self.ssd.prefetch(on_disk)
        return on_disk

    def decide(self, ids: Sequence[bytes], everywhere: bool = True) -> RestoreDecision:
        """How many leading blocks of `ids` to restore now, and how long to wait for the rest.

        `everywhere`: whether every rank has read what this rank has read from SSD. If not, an
        SSD block already in this rank's memory still counts as being read: the RAM tier is the
        same on every rank, this rank's staging area is not."""
        where, sizes = [], []
        for block_id in ids:
            if self.ram.contains(block_id):
                where.append("memory")
                sizes.append(self.cost.block_bytes)
                continue
            state = self.ssd.state(block_id) if self.ssd is not None else "absent"
            if state not in ("memory", "staged", "reading"):
                break  # absent, or on disk and not being read: prefilled
            where.append(state if everywhere else "reading")
            sizes.append(self.ssd.file_bytes(block_id) or self.cost.block_bytes)
        return self.cost.plan(where, sizes)

    def plan_sequence(
        self, seq: NewSequence, ids: Sequence[bytes] | None = None, everywhere: bool = True
    ) -> NewSequence:
        """Fill `restore_blocks` with the leading cached blocks worth restoring now (SSD blocks
        only when `everywhere`: every rank has read them, see decide)."""
        if ids is None:
            ids = self.block_ids(seq.prompt, seq.adapter)
        n = self.decide(ids, everywhere).blocks if ids else 0
        cached = 0
        while cached < len(ids) and self._has(ids[cached]):
            cached += 1
        self._stats.recomputed_blocks += max(0, cached - n)
        return dataclasses.replace(seq, restore_blocks=tuple(ids[:n]))

    def count_held(self) -> None:
        self._stats.held += 1

    def prefetch(self, ids: Sequence[bytes], step: int | None = None) -> None:
        """Start reading these blocks from this rank's SSD tier (those not in RAM), in the
        background; once they are read (or found missing), `on_prefetched(step)` tells rank 0."""
        if self.ssd is not None and ids:
            self.ssd.prefetch([b for b in ids if not self.ram.contains(b)])
        if step is not None and ids and self.on_prefetched is not None:
            if self.ssd is not None:
                self.ssd.mark(step)
            else:
                self.on_prefetched(step)  # no tier here: nothing to read, nothing to wait for

    def _prefetched(self, step: int) -> None:
        callback = self.on_prefetched
        if callback is not None:
            callback(step)

    def _has(self, block_id: bytes) -> bool:
        return self.ram.contains(block_id) or (self.ssd is not None and self.ssd.contains(block_id))

    def cached_tokens(self, seq: NewSequence) -> int:
        """Tokens rank 0 plans to restore (the executor reports what was actually restored)."""
        return len(seq.restore_blocks) * self.block_size

    def cached_prefix_tokens(self, prompt: Sequence[int], adapter: int = 0) -> int:
        """How many leading tokens of `prompt` are cached now, counting full blocks (read-only)."""
        n = 0
        for block_id in block_hashes(self.namespace, prompt, root=self._root(adapter)):
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
        """The leading blocks of `ids` this rank has in memory: (id, block, came from RAM).
        Never reads the disk: a block still being prefetched ends the run (it is prefilled)."""
        out = []
        for block_id in ids:
            block = self.ram.peek(block_id)
            from_ram = block is not None
            if block is None and self.ssd is not None:
                block = self.ssd.take(block_id)
            if block is None or block.n_tokens != self.block_size:
                break
            out.append((block_id, block, from_ram))
        return out

    # ---- every rank: store ------------------------------------------------------------------
    def on_prompt_done(self, seq: NewSequence, prompt_cache, tokens: Sequence[int]) -> None:
        """The prompt is prefilled: store its blocks now, so concurrent requests can share them."""
        self._store(prompt_cache, tokens, seq.adapter)

    def on_sequence_done(self, seq: NewSequence, prompt_cache, all_tokens: Sequence[int]) -> None:
        """A sequence finished or was dropped: store its prompt and generated blocks."""
        self._store(prompt_cache, all_tokens, seq.adapter)

    def _store(self, caches, tokens: Sequence[int], adapter: int = 0) -> None:
        if not caches or caches[0].keys is None or (adapter and adapter not in self._adapter_roots):
            return
        n_tokens = min(len(tokens), caches[0].offset)
        ids = block_hashes(self.namespace, tokens[:n_tokens], root=self._root(adapter))
        first = 0
        while first < len(ids) and self.ram.contains(ids[first]):
            first += 1
        missing = [i for i in range(first, len(ids)) if not self.ram.contains(ids[i])]
        if not missing:
            return
        blocks = self.codec.encode(caches, first, len(ids) - first)
        self._raw_per_stored = blocks[0].raw_nbytes / max(1, blocks[0].nbytes)
        self.cost.block_bytes = blocks[0].nbytes
        new = {i: blocks[i - first] for i in missing}
        self._store_chain(ids, new)
        if self.write_through:
            self._to_disk([(ids[i], new[i]) for i in sorted(new)])
        self._stats.stored_blocks += len(new)

    def _store_chain(self, ids: Sequence[bytes], new: dict[int, Block]) -> None:
        """Put a chain's new blocks (by index) into RAM, then mark the chain used, head last.

        A block is only useful after its ancestors, so the chain is pinned while it is stored
        (a tail never evicts its own head), and the head ends up most recent, so under pressure
        a chain loses its tail first. What does not fit goes to the SSD tier.
        """
        self.ram.pin(ids)
        evicted = []
        try:
            for i in sorted(new):
                evicted += self.ram.put(ids[i], new[i])
        finally:
            self.ram.unpin(ids)
        for block_id in reversed(ids):
            self.ram.touch(block_id)
        self._to_disk(evicted)  # write_back: what leaves RAM goes to disk

    def _to_disk(self, blocks: list[tuple[bytes, Block]]) -> None:
        """Queue (id, block) pairs for writing, as host-readable copies, those the SSD tier
        lacks and its write queue has room for (no copy is made for a dropped write)."""
        if self.ssd is None:
            return
        todo = self.ssd.admit(blocks)
        for (block_id, _), block in zip(todo, for_host([b for _, b in todo])):
            self.ssd.write(block_id, block)

    def calibrate(self, nbytes: int = 16 << 20) -> None:
        """Measure what restoring a block costs per byte: from the device (a RAM-tier block: one
        copy), and from host memory (a block read from SSD: the upload `blockfile.to_block`
        makes, then the copy)."""
        x = mx.zeros((nbytes // 4,), dtype=mx.float32)
        host = np.ones(nbytes, dtype=np.uint8)
        mx.eval(x)
        copy = upload = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            mx.eval(mx.concatenate([x[: x.size // 2], x[x.size // 2 :]]))
            copy = min(copy, time.perf_counter() - started)
            started = time.perf_counter()
            y = mx.array(host).view(mx.float32)
            mx.eval(mx.concatenate([y[: y.size // 2], y[y.size // 2 :]]))
            upload = min(upload, time.perf_counter() - started)
        self.cost.copy.add(copy / nbytes)
        self.cost.upload.add(upload / nbytes)

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
        s.cost = self.cost.to_dict()
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
