"""Cut a sequence's KV cache into blocks, and glue blocks back into a cache.

A block holds the keys and values of `block_size` tokens for every layer of this rank's
shard, stacked as (layers, kv_heads, block_size, head_dim) arrays named "k" and "v". With
`kv_bits` set each is stored quantized along head_dim as three arrays ("k.q", "k.s", "k.b":
packed values, scales, biases) and dequantized on restore.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache

log = logging.getLogger(__name__)

_GROUP_SIZES = (128, 64, 32)  # the group sizes mx.quantize accepts
_warned: set[str] = set()


@dataclass
class Block:
    """One block of KV for this rank's heads: evaluated arrays that own their memory."""

    arrays: dict[str, mx.array]
    n_tokens: int
    raw_nbytes: int  # what the block would take unquantized

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# CUDA keeps arrays in device memory. The first host read of one (the SSD writer's memoryview)
# makes MLX move it to host-visible memory with a synchronous cudaMemcpy, under the GIL, on the
# thread that reads: the engine thread stalls behind every block the writer touches.
_DEVICE_MEMORY = mx.cuda.is_available() and mx.default_device() == mx.gpu


def for_host(blocks: Sequence[Block]) -> list[Block]:
    """Blocks whose bytes the host can read without that stall (for the SSD writer).

    On CUDA: copies, made on the device and moved to host-visible memory by the device's own
    stream (MLX moves an array made on the GPU to unified memory, asynchronously, when a CPU-stream
    op reads it in the same eval). The originals stay in device memory for the RAM tier, where
    restores read them at device speed. Elsewhere (CPU, Apple silicon's unified memory) host
    reads are free: the blocks themselves.
    """
    if not _DEVICE_MEMORY or not blocks:
        return list(blocks)
    # a * 1: a fresh buffer with the same bits (mlx has no copy op; x * 1 keeps -0.0 and NaNs).
    copies = [Block({n: a * 1 for n, a in b.arrays.items()}, b.n_tokens, b.raw_nbytes) for b in blocks]
    readers = [mx.flatten(a, stream=mx.cpu) for b in copies for a in b.arrays.values()]
    mx.eval([b.arrays for b in copies], readers)
    return copies


def effective_group_size(head_dim: int, group_size: int) -> int | None:
    """The quantization group for a head_dim: the configured one, or the largest smaller one that
    divides head_dim (head_dim 32 with group 64 uses 32); None when no group fits."""
    for g in _GROUP_SIZES:
        if g <= group_size and head_dim % g == 0:
            return g
    return None


class BlockCodec:
    """Encodes caches into blocks and decodes blocks into caches for one model shard."""

    def __init__(self, block_size: int, kv_bits: int | None, kv_group_size: int):
        self.block_size = block_size
        self.kv_bits = kv_bits
        self.kv_group_size = kv_group_size

    # ---- cache -> blocks --------------------------------------------------------------
    def encode(self, caches: Sequence[KVCache], first_block: int, n_blocks: int) -> list[Block]:
        """Blocks `first_block .. first_block + n_blocks - 1` of a single-sequence cache."""
        if n_blocks <= 0:
            return []
        bs = self.block_size
        start, stop = first_block * bs, (first_block + n_blocks) * bs
        parts: dict[str, list[mx.array]] = {}
        raw_per_block = 0
        for name, attr in (("k", "keys"), ("v", "values")):
            # (layers, heads, tokens, head_dim): stack allocates a fresh buffer, not a view of the batch cache.
            quantized = getattr(caches[0], "bits", None)
            if quantized is None:
                x = mx.stack([getattr(c, attr)[0, :, start:stop, :] for c in caches])
                raw_per_block += x.nbytes // n_blocks
                encoded = self._quantize(name, x)
            else:  # a quantized live cache (engine/kv_quant.py)
                encoded, raw = self._from_quantized(caches, attr, start, stop)
                raw_per_block += raw // n_blocks
            for suffix, arr in encoded:
                # contiguous() copies each slice so a block never keeps its neighbours alive.
                parts[name + suffix] = [mx.contiguous(arr[:, :, i * bs : (i + 1) * bs]) for i in range(n_blocks)]
        blocks = [Block({n: p[i] for n, p in parts.items()}, bs, raw_per_block) for i in range(n_blocks)]
        mx.eval([b.arrays for b in blocks])
        return blocks

    def _quantize(self, name: str, x: mx.array) -> list[tuple[str, mx.array]]:
        if self.kv_bits is None:
            return [("", x)]
        group = effective_group_size(x.shape[-1], self.kv_group_size)
        if group is None:
            if name not in _warned:
                _warned.add(name)
                log.warning("head_dim %d has no quantization group; storing %s blocks unquantized", x.shape[-1], name)
            return [("", x)]
        q, scales, biases = mx.quantize(x, group_size=group, bits=self.kv_bits)
        return [(".q", q), (".s", scales), (".b", biases)]

    def _from_quantized(self, caches, attr: str, start: int, stop: int):
        """Blocks from a quantized live cache: its own bytes when the formats match (lossless),
        else dequantized and encoded as configured. Also the full-precision size, for stats."""
        c0 = caches[0]
        parts = [mx.stack([getattr(c, attr)[i][0, :, start:stop, :] for c in caches]) for i in range(3)]
        head_dim = parts[1].shape[-1] * c0.group_size
        raw = parts[1].size // parts[1].shape[-1] * head_dim * parts[1].dtype.size
        same_format = self.kv_bits == c0.bits and effective_group_size(head_dim, self.kv_group_size) == c0.group_size
        x = None if same_format else mx.dequantize(*parts, group_size=c0.group_size, bits=c0.bits)
        if x is None:
            return [(".q", parts[0]), (".s", parts[1]), (".b", parts[2])], raw
        return self._quantize(attr[0], x), raw

    # ---- blocks -> cache --------------------------------------------------------------
    def decode(self, blocks: Sequence[Block], live=None) -> list[KVCache]:
        """A per-layer KVCache holding the blocks' tokens, in order (batch dimension 1); with
        `live` (a kv_quant.LiveKV), a quantized one in that format."""
        assert blocks, "decode needs at least one block"
        if live is not None:
            return self._decode_quantized(blocks, live)
        stacked = {}
        for name in ("k", "v"):
            stacked[name] = self._dequantize(name, blocks)
        caches = []
        for layer in range(stacked["k"].shape[0]):
            c = KVCache()
            c.state = (stacked["k"][layer : layer + 1], stacked["v"][layer : layer + 1], stacked["k"].shape[2])
            caches.append(c)
        return caches

    def _dequantize(self, name: str, blocks: Sequence[Block]) -> mx.array:
        def cat(key: str) -> mx.array:
            parts = [b.arrays[key] for b in blocks]
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

        if name in blocks[0].arrays:
            return cat(name)
        q, scales = cat(name + ".q"), cat(name + ".s")
        bits = self.kv_bits
        head_dim = q.shape[-1] * 32 // bits
        group = head_dim // scales.shape[-1]
        return mx.dequantize(q, scales, cat(name + ".b"), group_size=group, bits=bits)

    def _decode_quantized(self, blocks: Sequence[Block], live) -> list:
        stacked = {}
        for name in ("k", "v"):
            if name + ".q" in blocks[0].arrays and self.kv_bits == live.bits:
                parts = [mx.concatenate([b.arrays[name + sfx] for b in blocks], axis=2) for sfx in (".q", ".s", ".b")]
                if parts[0].shape[-1] * 32 // live.bits == parts[1].shape[-1] * live.group_size:
                    stacked[name] = parts  # the live cache's own bytes: lossless
                    continue
            x = self._dequantize(name, blocks)
            stacked[name] = list(mx.quantize(x, group_size=live.group_size, bits=live.bits))
        caches = []
        n_tokens = stacked["k"][0].shape[2]
        for layer in range(stacked["k"][0].shape[0]):
            c = live.sequence_cache()
            c.keys = tuple(p[layer : layer + 1] for p in stacked["k"])
            c.values = tuple(p[layer : layer + 1] for p in stacked["v"])
            c.offset = n_tokens
            caches.append(c)
        return caches
