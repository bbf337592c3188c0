"""Block ids: a chain of hashes over fixed-size token blocks, scoped by a namespace.

A block id is H(parent id, block tokens), so equal ids mean equal *prefixes*, not just equal
blocks, and the first block's parent is the namespace digest. The namespace covers everything
that changes the bytes of a stored block (model, tensor-parallel size, dtype, quantization,
block size, on-disk format), so two configurations can never read each other's blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# Bump when the stored block layout changes: it is part of the namespace and of each SSD file.
FORMAT_VERSION = 2  # 2: xxh3-128 checksums, files under v<format>/
DIGEST_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """What a stored block's bytes depend on; its digest roots every hash chain."""

    model_fingerprint: str
    tp_size: int
    dtype: str  # the KV dtype, e.g. "float32", "bfloat16"
    kv_bits: int | None
    kv_group_size: int
    block_size: int
    format_version: int = FORMAT_VERSION
    # Blocks computed by a quantized live cache (engine/kv_quant.py) differ from full-precision
    # ones; part of the digest only when set, so existing namespaces keep their digests.
    live_kv_bits: int | None = None

    @property
    def digest(self) -> bytes:
        text = (
            f"mlx-cluster-kv|v{self.format_version}|{self.model_fingerprint}|tp{self.tp_size}|{self.dtype}"
            f"|bits{self.kv_bits or 0}|g{self.kv_group_size}|bs{self.block_size}"
            + (f"|live{self.live_kv_bits}" if self.live_kv_bits else "")
        )
        return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()

    def fields(self) -> dict[str, str]:
        """The namespace as string metadata (safetensors metadata values are strings)."""
        return {
            "format_version": str(self.format_version),
            "model_fingerprint": self.model_fingerprint,
            "tp_size": str(self.tp_size),
            "dtype": self.dtype,
            "kv_bits": str(self.kv_bits or 0),
            "kv_group_size": str(self.kv_group_size),
            "block_size": str(self.block_size),
            "namespace": self.digest.hex(),
        } | ({"live_kv_bits": str(self.live_kv_bits)} if self.live_kv_bits else {})


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The id of a block given its parent's id and its tokens."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(tokens if isinstance(tokens, bytes) else struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


def adapter_root(namespace: Namespace, adapter_fingerprint: str) -> bytes:
    """The chain root of a LoRA adapter's blocks: its KV differs from the base model's."""
    return block_hash(namespace.digest, b"lora|" + adapter_fingerprint.encode())


def block_hashes(
    namespace: Namespace, tokens: Sequence[int], max_blocks: int | None = None, root: bytes | None = None
) -> list[bytes]:
    """Ids of the full blocks of `tokens` (at most `max_blocks`), in order; `root` replaces the
    namespace digest as the first parent (see adapter_root)."""
    bs = namespace.block_size
    n = len(tokens) // bs
    if max_blocks is not None:
        n = min(n, max_blocks)
    ids, parent = [], root or namespace.digest
    for i in range(n):
        parent = block_hash(parent, tokens[i * bs : (i + 1) * bs])
        ids.append(parent)
    return ids


def restorable_blocks(prompt_len: int, block_size: int) -> int:
    """The most blocks a prompt may restore: the batcher must still prefill at least one token."""
    return max(0, (prompt_len - 1) // block_size)
