"""Quantized live KV: the running batch's keys and values stored at 8 or 4 bits.

mlx-lm quantizes a single stream's cache (`QuantizedKVCache`) and its attention reads a
quantized cache with `mx.quantized_matmul` (`models/base.py`, chosen when the cache has
`bits`), but its continuous batcher only knows the 16-bit `BatchKVCache`. Here is the batched
twin: `BatchQuantizedKVCache` keeps what `BatchKVCache` keeps (left padding, per-row offsets,
room grown 256 tokens at a time) as mlx-lm's (packed, scales, biases) triples, and supports
what the batcher does with it: merge per-sequence caches, prefill with right padding, extend
with joining rows, filter finished ones, extract one row, trim.

When it quantizes: every key and value is quantized as it is written, and every attention,
prefill included, reads the quantized cache. A sequence's tokens are therefore those of
mlx-lm's single stream with a `QuantizedKVCache` from the start (`generate(...,
prompt_cache=[QuantizedKVCache(group, bits)] * layers)`; on CUDA, that stream attending its cache
dequantized: below). On a CPU a prefill chunk reads the
same quantized values dequantized, through the fused SDPA kernel (`DequantizedReads`: mlx's CPU
`quantized_matmul` made prefill 4x slower); only the rounding of the attention differs.
mlx-lm's `generate(kv_bits=...)` differs only in its first prefill chunk, which it attends at
full precision before converting.
Quantizing at write keeps the memory bound exact (no 16-bit prompt ever sits in the batch) and
makes prefix-cache restores lossless: stored blocks are the live cache's own bytes.

Each rank quantizes its own KV heads (a tensor-parallel shard is just fewer heads).

Contiguous reads: the cache keeps room for 256 more tokens, so what attention reads is a view
whose rows are strided. Metal and the CPU multiply such views; mlx's CUDA `quantized_matmul`
(0.32) has kernels only for row-contiguous operands and refuses the view ("No implementation
for problem shape"). When the start-up probe finds that (`LiveKV.contiguous_reads`), attention
reads the whole allocation, which is row-contiguous, and the causal mask covers the unused room
as it covers future tokens: masked scores weigh exactly zero, so the tokens are those of the
view. It costs attention over at most 255 more positions, where a contiguous copy of the view
cost six copy kernels per layer and step (~190 on a 32-layer model; 1.5x the step on an H200).
Operations that would leave the allocation a strided view (dropping shared left padding) copy
it once instead.

Attention over whole allocations (`Allocation`, the CUDA mode) never takes mlx's quantized
products: on CUDA (mlx 0.32.4) they compute mlx-lm's grouped-query attention wrongly (the keys'
broadcast over a KV head's query heads; largest error 2.5 on outputs of at most 1.8, where the
fused SDPA kernel over the same cache dequantized lands within 0.02: docs/benchmarks.md). A
decode step goes through one CUDA kernel (engine/cuda_kv_attention.py: correct, and 1.6 ms for
an `8b` shard's 32 layers against 3.0 ms); prefill chunks, verification and anything the kernel
does not fit read the allocation dequantized, through the fused SDPA kernel. `_attention` does
this, installed where mlx-lm's models look up quantized attention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models import base as mlx_lm_base
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache, dynamic_roll, make_prompt_cache

from mlx_cluster.cache.blocks import effective_group_size
from mlx_cluster.engine import cuda_kv_attention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveKV:
    """The live cache's quantization: bits per value, and the group along head_dim."""

    bits: int
    group_size: int
    contiguous_reads: bool = False  # the backend multiplies only row-contiguous operands (module docstring)

    def empty_caches(self, n_layers: int) -> list[QuantizedSequenceCache]:
        return [self.sequence_cache() for _ in range(n_layers)]

    def sequence_cache(self) -> QuantizedSequenceCache:
        return QuantizedSequenceCache(self.group_size, self.bits, self.contiguous_reads)


class QuantizedSequenceCache(QuantizedKVCache):
    """One sequence's quantized KV (empty, restored, or extracted), mergeable into a batch."""

    def __init__(self, group_size: int = 64, bits: int = 8, contiguous_reads: bool = False):
        super().__init__(group_size, bits)
        self.contiguous_reads = contiguous_reads

    def update_and_fetch(self, keys, values):
        kv = super().update_and_fetch(keys, values)
        if not self.contiguous_reads:
            return kv
        # Batches read their whole allocation (BatchQuantizedKVCache); a lone sequence's attention copies.
        return tuple(Allocation(mx.contiguous(x) for x in part) for part in kv)

    def size(self):
        return self.offset

    @classmethod
    def merge(cls, caches):
        return BatchQuantizedKVCache.merge(caches)


def _pad_tokens(x: mx.array, left: int, right: int) -> mx.array:
    if left == 0 and right == 0:
        return x
    return mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)])


class BatchQuantizedKVCache(_BaseCache):
    """mlx-lm's BatchKVCache with quantized storage; `keys`/`values` are (packed, scales, biases)."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int, contiguous_reads: bool = False):
        self.keys = None
        self.values = None
        self.group_size = group_size
        self.bits = bits  # its presence makes mlx-lm's attention take the quantized path
        self.contiguous_reads = contiguous_reads
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding = None

    # ---- writing ---------------------------------------------------------------------
    def update_and_fetch(self, keys, values):
        prev, n = self._idx, keys.shape[2]
        size = self._allocation_after(n)
        if size != self._allocated():
            grow = size - prev
            new_k, new_v = (
                self._quantize(mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)),
                self._quantize(mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)),
            )
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                # Cut unused room first, as mlx-lm's caches do, so growth stays step-aligned.
                self.keys, self.values = tree_map(lambda x: x[..., :prev, :], (self.keys, self.values))
                self.keys = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(self.keys, new_k))
                self.values = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(self.values, new_v))
        self.offset = self.offset + n
        self._idx += n
        # Plain slices, not `...`: this runs for every layer of every step, and on a host-bound
        # GPU step mx's Ellipsis indexing costs twice the host time (5.5 against 2.6 us each).
        for stored, new in ((self.keys, self._quantize(keys)), (self.values, self._quantize(values))):
            for s, x in zip(stored, new):
                s[:, :, prev : self._idx] = x
        if self.contiguous_reads:  # the whole allocation; make_mask hides the room past _idx
            return Allocation(self.keys), Allocation(self.values)
        return self.keys_and_values()

    def _allocated(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _allocation_after(self, n: int) -> int:
        """The allocation's length once n more tokens are written: as it is if they fit, else cut
        at the last token and grown by whole steps. update_and_fetch grows it so; make_mask spans it."""
        if self._idx + n <= self._allocated():
            return self._allocated()
        return self._idx + (self.step + n - 1) // self.step * self.step

    def _stored(self, view: mx.array) -> mx.array:
        """A view about to become the allocation: copied when attention reads the allocation whole."""
        return mx.contiguous(view) if self.contiguous_reads else view

    def _quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def keys_and_values(self):
        idx = self._idx  # every layer, every step: tuples, not tree_map (36 against 14 us)
        return tuple(x[:, :, :idx] for x in self.keys), tuple(x[:, :, :idx] for x in self.values)

    # ---- prefill padding (the batcher right-pads prompts, then rolls them left) -------
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty BatchQuantizedKVCache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = tree_map(
                lambda x: dynamic_roll(x, padding[:, None], axis=2), (self.keys, self.values)
            )
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    # ---- rows joining and leaving ----------------------------------------------------
    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:  # drop padding every row has
            if self.keys is not None:
                self.keys, self.values = tree_map(
                    lambda x: self._stored(x[..., min_left_pad:, :]), (self.keys, self.values)
                )
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other):
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        max_idx = max(self._idx, other._idx)
        template = self if self.keys is not None else other
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c):
            # Right-justify both at the current index, at a common size.
            if c.keys is None:
                rows = c.offset.shape[0]
                k, v = (
                    tree_map(lambda t: mx.zeros((rows, t.shape[1], 0, t.shape[3]), t.dtype), template.keys),
                    tree_map(lambda t: mx.zeros((rows, t.shape[1], 0, t.shape[3]), t.dtype), template.values),
                )
            else:
                k, v = c.keys, c.values
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k, v = tree_map(lambda x: x[..., :right, :], (k, v))
                right = 0
            k, v = tree_map(lambda x: _pad_tokens(x, left, right), (k, v))
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx):
        """Row `idx` as its own QuantizedSequenceCache, holding copies of its tokens only."""
        cache = QuantizedSequenceCache(self.group_size, self.bits, self.contiguous_reads)
        padding = self.left_padding.tolist()[idx]
        cache.keys, cache.values = tree_map(
            lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]), (self.keys, self.values)
        )
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches):
        """One batch cache from per-sequence QuantizedKVCaches (left-padded to the longest)."""
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        first = next(c for c in caches)
        contiguous = getattr(first, "contiguous_reads", False)
        if longest == 0:
            return cls([0] * len(caches), first.group_size, first.bits, contiguous)
        padding = [longest - n for n in lengths]
        full = next(c for c in caches if c.offset > 0)
        out = cls(padding, full.group_size, full.bits, contiguous)

        def zeros(parts):
            return tuple(mx.zeros((len(caches), p.shape[1], longest, p.shape[3]), p.dtype) for p in parts)

        keys, values = zeros(full.keys), zeros(full.values)
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.offset == 0:
                continue
            for dst, src in ((keys, c.keys), (values, c.values)):
                for d, s in zip(dst, src):
                    d[i : i + 1, :, p : p + c.offset] = s[..., : c.offset, :]
        out.keys, out.values = keys, values
        out.offset += longest
        out._idx = longest
        return out

    # ---- the rest of mlx-lm's cache interface ----------------------------------------
    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        mask = create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)
        if not self.contiguous_reads:
            return mask
        # Attention reads the whole allocation this update leaves: the room past the last token
        # is masked, as future tokens are.
        room = self._allocation_after(N) - (self._idx + N)
        return mx.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, room)]) if room else mask

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self):
        return self._idx

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))


# ---- attention over whole allocations (module docstring) ------------------------------------


class Allocation(tuple):
    """(packed, scales, biases) as a contiguous-reads cache hands them to attention (a batch's
    whole allocation, a lone sequence's copy): what `_attention` reads differently."""


_mlx_lm_attention = mlx_lm_base.quantized_scaled_dot_product_attention


def _attention(queries, q_keys, q_values, scale, mask, group_size: int = 64, bits: int = 8):
    """mlx-lm's quantized attention, except over whole allocations: there a decode step through
    the CUDA kernel where it fits, anything else dequantized through the fused SDPA kernel."""
    if not isinstance(q_keys, Allocation):
        return _mlx_lm_attention(queries, q_keys, q_values, scale, mask, group_size=group_size, bits=bits)
    if cuda_kv_attention.available() and cuda_kv_attention.fits(queries, q_keys, mask, group_size, bits):
        return cuda_kv_attention.attend(queries, q_keys, q_values, scale, mask, group_size, bits)
    return dequantized_attention(queries, q_keys, q_values, scale, mask, group_size, bits)


def dequantized_attention(queries, q_keys, q_values, scale, mask, group_size: int, bits: int):
    """Attention over quantized keys and values read dequantized, through the fused SDPA kernel
    (what the CUDA decode kernel computes too, to float32 rounding)."""
    keys = mx.dequantize(*q_keys, group_size=group_size, bits=bits)
    values = mx.dequantize(*q_values, group_size=group_size, bits=bits)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


# mlx-lm's models reach quantized attention through this module attribute (models/base.py's
# scaled_dot_product_attention calls it when the cache has `bits`).
mlx_lm_base.quantized_scaled_dot_product_attention = _attention


# ---- start-up: can this model use it, and what does it buy --------------------------------


class DequantizedReads:
    """A batch cache as a prefill chunk's attention reads it on a CPU: the same quantized
    storage, handed out dequantized, and without `bits`, so mlx-lm's attention takes the fused
    SDPA path instead of two `quantized_matmul`s.

    mlx's CPU `quantized_matmul` made a bf16 prefill of 8 x 1,024 tokens 4.1x slower than full
    precision; dequantizing each layer once per chunk brings it to 1.1x (docs/benchmarks.md,
    "Quantized live KV, CPU"). CUDA reads whole allocations through `_attention` instead (never
    mlx's quantized products there). Decode steps on a CPU read the quantized cache. What is
    stored is unchanged: keys and values are quantized as they are written, either way.
    """

    def __init__(self, cache: BatchQuantizedKVCache):
        self._cache = cache

    def update_and_fetch(self, keys, values):
        c = self._cache
        stored = c.update_and_fetch(keys, values)
        return tuple(mx.dequantize(*x, group_size=c.group_size, bits=c.bits).astype(keys.dtype) for x in stored)

    def __getattr__(self, name):
        if name == "bits":  # hasattr(cache, "bits") is mlx-lm's switch to quantized attention
            raise AttributeError(name)
        return getattr(self._cache, name)


def prefill_reads(caches: list) -> list:
    """The caches a prefill chunk runs on: quantized batch caches read dequantized on a CPU."""
    if mx.default_device() != mx.cpu:
        return caches
    return [DequantizedReads(c) if isinstance(c, BatchQuantizedKVCache) else c for c in caches]


@dataclass(frozen=True)
class KvBudget:
    """The live KV budget in tokens, and the per-token sizes it was derived from (this rank)."""

    tokens: int  # what admission may reserve
    bytes_per_token: int  # live KV bytes per token on this rank (all layers, keys and values)
    full_bytes_per_token: int  # the same at the model's own precision


def per_token_bytes(model, live: LiveKV | None) -> tuple[int, int]:
    """(full-precision, live) KV bytes per token on this rank, from one probe token's cache."""
    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    full = quant = 0
    for c in caches:
        for x in (getattr(c, "keys", None), getattr(c, "values", None)):
            if not isinstance(x, mx.array) or x.ndim != 4:
                continue  # not a KV tensor (SSM state, a cache list): not counted
            _, heads, _, dim = x.shape
            full += heads * dim * x.dtype.size
            if live is not None:
                # packed uint32 words, then one scale and one bias per group in the KV dtype
                quant += heads * (dim * live.bits // 8 + 2 * (dim // live.group_size) * x.dtype.size)
    return full, (quant if live is not None else full)


def _head_dims(model) -> list[int]:
    probe = make_prompt_cache(model)
    model(mx.array([[0]]), cache=probe)
    return sorted({x.shape[-1] for c in probe for x in (c.keys, c.values)})


def cache_kind_reason(model) -> str | None:
    """Why this model's KV cache cannot be quantized live (not plain per-layer KVCaches: rotating,
    SSM or chunked ones), or None."""
    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {KVCache.__name__}:
        return f"its KV cache is not plain per-layer KVCache ({', '.join(sorted(kinds))})"
    return None


def attention_error(model, live: LiveKV) -> str | None:
    """The probe: one prefill and one decode step on a quantized batch cache; the error, if any.

    The model's own attention decides: MLA (deepseek_v3) does matrix products on the cache's
    contents and fails; attention sinks (gpt_oss) are refused by mlx-lm's quantized attention;
    mlx's CUDA kernels refuse strided views (the module docstring).
    """
    try:
        caches = [BatchQuantizedKVCache.merge([c]) for c in live.empty_caches(len(make_prompt_cache(model)))]
        mx.eval(model(mx.array([[0, 0]]), cache=caches))
        mx.eval(model(mx.array([[0]]), cache=caches))
    except Exception as e:  # any failure means no
        return f"{type(e).__name__}: {e}"
    return None


def readable_live_kv(model, live: LiveKV) -> tuple[LiveKV | None, str | None]:
    """`live` as this backend's attention can read it: as it is, else with contiguous reads
    (logged; attention then never takes mlx's quantized products, module docstring); or (None,
    the first probe's error)."""
    error = attention_error(model, live)
    if error is None:
        return live, None
    fallback = replace(live, contiguous_reads=True)
    if attention_error(model, fallback) is not None:
        return None, error
    log.info(
        "live KV cache: this backend's quantized attention needs contiguous operands; each attention reads "
        "its layer's whole %d-bit allocation, the unused room masked (at most 255 more positions, the same capacity); "
        "%s dequantized through the fused SDPA kernel",
        live.bits,
        "decode steps through one CUDA kernel where it fits (8 bits, head_dim 128), the rest"
        if cuda_kv_attention.available()
        else "every attention",
    )
    return fallback, None


def resolve_live_kv(cache_cfg, model) -> LiveKV | None:
    """The live KV quantization for `cache:` settings, checked against the model.

    `live_kv_bits: auto` follows `kv_bits` and falls back to full precision, with a warning, on a
    model that cannot use it; an explicit `live_kv_bits` the model cannot use is an error. The
    group is `kv_group_size`, or the largest smaller one that divides head_dim (as stored blocks do).
    A backend whose quantized attention refuses strided views gets contiguous reads.
    """
    setting = cache_cfg.live_kv_bits
    bits = cache_cfg.kv_bits if setting == "auto" else setting
    if bits is None:
        return None
    live, reason = None, None
    if type(make_prompt_cache(model)[0]) is KVCache:
        dims = _head_dims(model)
        groups = {effective_group_size(d, cache_cfg.kv_group_size) for d in dims}
        if None in groups or len(groups) > 1:
            reason = f"its head dims {dims} do not split into one quantization group (32, 64 or 128)"
        else:
            live = LiveKV(bits, groups.pop())
    reason = reason or cache_kind_reason(model)
    if reason is None:  # plain caches with one group: `live` is set
        log.info("live KV cache: probing %d-bit attention (the first use on a CUDA machine compiles kernels)", bits)
        usable, error = readable_live_kv(model, live)
        if usable is not None:
            return usable
        reason = f"its attention cannot read a quantized cache ({error})"
    if setting == "auto":
        log.warning(
            "live KV cache stays at full precision: %s; cache.kv_bits=%d still applies to stored prefix blocks "
            "(set cache.live_kv_bits: null to silence this)",
            reason,
            bits,
        )
        return None
    raise ValueError(
        f"cache.live_kv_bits={bits}: this model cannot use a quantized live KV cache: {reason}. "
        "Set cache.live_kv_bits: null (full-precision live KV) or use another model."
    )


def kv_budget(max_kv_tokens: int, model, live: LiveKV | None, rank: int = 0) -> KvBudget:
    """Admission's token budget: `scheduler.max_kv_tokens` is memory sized in full-precision
    tokens, so a quantized cache fits proportionally more tokens in it. Logs what fits."""
    full, live_bytes = per_token_bytes(model, live)
    if not full:
        log.info("live KV cache on rank %d: size per token not measured; %d tokens admitted", rank, max_kv_tokens)
        return KvBudget(max_kv_tokens, 0, 0)
    tokens = max_kv_tokens * full // live_bytes
    budget_mb = max_kv_tokens * full / 1e6
    if live is None:
        log.info(
            "live KV cache on rank %d: full precision, %d B/token: scheduler.max_kv_tokens=%d fits %d "
            "concurrent tokens in %.1f MB",
            rank,
            full,
            max_kv_tokens,
            tokens,
            budget_mb,
        )
    else:
        log.info(
            "live KV cache on rank %d: %d-bit (group %d), %d B/token vs %d at full precision: "
            "scheduler.max_kv_tokens=%d (%.1f MB at full precision) fits %d concurrent tokens (%.2fx)",
            rank,
            live.bits,
            live.group_size,
            live_bytes,
            full,
            max_kv_tokens,
            budget_mb,
            tokens,
            full / live_bytes,
        )
    return KvBudget(tokens, live_bytes, full)
