"""Prefix cache units: block hashing, the block codec (with quantization), the RAM tier, the
block file format and the plan flag. No model: blocks are built from random KV."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlx_cluster.cache import blockfile
from mlx_cluster.cache.blocks import Block, BlockCodec, effective_group_size
from mlx_cluster.cache.hashing import FORMAT_VERSION, Namespace, block_hashes, restorable_blocks
from mlx_cluster.cache.ram import RamTier
from mlx_cluster.engine.plan import (
    FLAG_CLEAR_CACHE,
    NewSequence,
    PlanDecodeError,
    SamplingParams,
    StepPlan,
    decode_plan,
    encode_plan,
)

NS = Namespace("f" * 64, tp_size=1, dtype="float32", kv_bits=None, kv_group_size=64, block_size=4)


def kv_caches(layers=2, heads=2, tokens=12, head_dim=32, seed=0, dtype=mx.float32) -> list[KVCache]:
    mx.random.seed(seed)
    caches = []
    for _ in range(layers):
        c = KVCache()
        k = mx.random.normal((1, heads, tokens, head_dim)).astype(dtype)
        v = mx.random.normal((1, heads, tokens, head_dim)).astype(dtype)
        c.state = (k, v, tokens)
        caches.append(c)
    return caches


# ---- hashing ------------------------------------------------------------------------------


def test_block_ids_chain_over_full_blocks_only():
    ids = block_hashes(NS, list(range(10)))
    assert len(ids) == 2 and all(len(b) == 16 for b in ids)  # 10 tokens = 2 full blocks of 4
    assert block_hashes(NS, list(range(8))) == ids
    # A block's id depends on everything before it, not just on its own tokens.
    other = block_hashes(NS, [99, 1, 2, 3, 4, 5, 6, 7])
    assert other[0] != ids[0] and other[1] != ids[1]
    assert block_hashes(NS, list(range(100)), max_blocks=3) == block_hashes(NS, list(range(12)))


@pytest.mark.parametrize(
    "field,value",
    [("model_fingerprint", "e" * 64), ("tp_size", 2), ("dtype", "bfloat16"), ("kv_bits", 8), ("kv_group_size", 32)],
)
def test_namespace_isolates_configurations(field, value):
    other = Namespace(**{**NS.__dict__, field: value})
    assert block_hashes(other, list(range(8))) != block_hashes(NS, list(range(8)))
    assert other.digest != NS.digest


def test_namespace_fields_name_the_format():
    assert NS.fields()["format_version"] == str(FORMAT_VERSION)
    assert NS.fields()["namespace"] == NS.digest.hex()


def test_restore_leaves_at_least_one_token_to_prefill():
    assert restorable_blocks(16, 16) == 0  # one full block, but the last token must be computed
    assert restorable_blocks(17, 16) == 1
    assert restorable_blocks(33, 16) == 2
    assert restorable_blocks(0, 16) == 0


# ---- codec ------------------------------------------------------------------------------


def test_encode_decode_round_trip_is_exact_without_quantization():
    caches = kv_caches(tokens=12)
    codec = BlockCodec(4, None, 64)
    blocks = codec.encode(caches, first_block=1, n_blocks=2)  # tokens 4..11
    assert [b.arrays["k"].shape for b in blocks] == [(2, 2, 4, 32)] * 2
    restored = codec.decode(blocks)
    assert len(restored) == 2 and restored[0].offset == 8
    for c, r in zip(caches, restored):
        assert mx.array_equal(c.keys[:, :, 4:12], r.keys)
        assert mx.array_equal(c.values[:, :, 4:12], r.values)


def test_blocks_own_their_memory():
    """A stored block must not be a view that keeps the whole batch cache alive."""
    caches = kv_caches(layers=1, heads=1, tokens=4096)
    blocks = BlockCodec(16, None, 64).encode(caches, 0, 1)
    mx.clear_cache()
    before = mx.get_active_memory()
    del caches
    mx.clear_cache()
    freed = before - mx.get_active_memory()
    assert freed >= 2 * 4096 * 32 * 4 * 0.9
    assert blocks[0].nbytes == 2 * 16 * 32 * 4


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
def test_quantized_round_trip(bits, tol):
    caches = kv_caches(tokens=8, head_dim=64)
    codec = BlockCodec(4, bits, 64)
    blocks = codec.encode(caches, 0, 2)
    assert set(blocks[0].arrays) == {"k.q", "k.s", "k.b", "v.q", "v.s", "v.b"}
    assert blocks[0].nbytes < blocks[0].raw_nbytes * (0.3 if bits == 8 else 0.2)
    restored = codec.decode(blocks)
    err = mx.abs(restored[0].keys - caches[0].keys).max().item()
    assert err < tol * mx.abs(caches[0].keys).max().item()


def test_quantization_group_falls_back_to_head_dim():
    assert effective_group_size(128, 64) == 64
    assert effective_group_size(32, 64) == 32  # builtin:tiny has head_dim 32
    assert effective_group_size(48, 64) is None
    blocks = BlockCodec(4, 8, 64).encode(kv_caches(tokens=4, head_dim=32), 0, 1)
    assert blocks[0].arrays["k.s"].shape[-1] == 1  # one group of 32 per head vector


def test_bfloat16_blocks_survive_the_file_format():
    codec = BlockCodec(4, None, 64)
    [block] = codec.encode(kv_caches(tokens=4, dtype=mx.bfloat16), 0, 1)
    back = blockfile.decode(blockfile.encode(block, {"a": "1"}), {"a": "1"})
    assert back.arrays["k"].dtype == mx.bfloat16 and mx.array_equal(back.arrays["k"], block.arrays["k"])


@pytest.mark.parametrize("device_memory", [False, True])
def test_blocks_for_the_disk_writer_hold_the_same_bytes(monkeypatch, device_memory):
    """CPU and Apple silicon hand the writer the blocks themselves; CUDA (simulated here: the
    same ops on the CPU) hands it evaluated copies, so the RAM tier keeps device-resident ones."""
    from mlx_cluster.cache import blocks as blocks_module

    monkeypatch.setattr(blocks_module, "_DEVICE_MEMORY", device_memory)
    originals = BlockCodec(4, 8, 32).encode(kv_caches(tokens=8), 0, 2)
    copies = blocks_module.for_host(originals)
    for a, b in zip(originals, copies):
        assert (a is b) is not device_memory
        assert (a.n_tokens, a.raw_nbytes, sorted(a.arrays)) == (b.n_tokens, b.raw_nbytes, sorted(b.arrays))
        meta = {"block": "x"}
        assert blockfile.encode(a, meta) == blockfile.encode(b, meta)


# ---- RAM tier -------------------------------------------------------------------------------


def fake_block(nbytes: int) -> Block:
    return Block({"k": mx.zeros((nbytes // 8, 1, 1, 1)), "v": mx.zeros((nbytes // 8, 1, 1, 1))}, 1, nbytes)


def test_ram_tier_evicts_least_recently_used_within_its_byte_budget():
    ram = RamTier(capacity_bytes=3000)
    for name in (b"a", b"b", b"c"):
        assert ram.put(name, fake_block(1000)) == []
    ram.touch(b"a")  # now b is the oldest
    assert ram.contains(b"b") and ram.peek(b"b") is not None  # read-only: no reorder
    evicted = ram.put(b"d", fake_block(1000))
    assert [e for e, _ in evicted] == [b"b"]
    assert ram.stats.bytes == 3000 and ram.stats.blocks == 3 and ram.stats.evictions == 1
    assert ram.put(b"a", fake_block(1000)) == []  # already present: nothing stored twice
    assert ram.stats.stores == 4


def test_pinned_blocks_are_not_evicted():
    ram = RamTier(capacity_bytes=2000)
    ram.put(b"a", fake_block(1000))
    ram.put(b"b", fake_block(1000))
    ram.pin([b"a", b"a"])
    assert [e for e, _ in ram.put(b"c", fake_block(1000))] == [b"b"]
    ram.unpin([b"a"])  # still pinned once
    assert [e for e, _ in ram.put(b"d", fake_block(1000))] == [b"c"]
    ram.unpin([b"a"])
    assert [e for e, _ in ram.put(b"e", fake_block(1000))] == [b"a"]


def test_block_that_cannot_fit_is_handed_back():
    ram = RamTier(capacity_bytes=1500)
    ram.put(b"a", fake_block(1000))
    ram.pin([b"a"])
    block = fake_block(1000)
    assert ram.put(b"b", block) == [(b"b", block)]  # the rest is pinned: it goes straight to the next tier
    assert RamTier(0).put(b"x", block) == [(b"x", block)]
    assert ram.stats.rejected == 1


def test_ram_clear():
    ram = RamTier(capacity_bytes=5000)
    ram.put(b"a", fake_block(1000))
    ram.clear()
    assert not ram.contains(b"a") and ram.stats.bytes == 0 and len(ram) == 0


# ---- plan flag ------------------------------------------------------------------------------


def test_plan_carries_restore_blocks_and_the_clear_flag():
    seq = NewSequence(1, (1, 2, 3), SamplingParams(max_tokens=4, seed=1), restore_blocks=(b"x" * 16, b"y" * 16))
    plan = StepPlan(step=3, new=(seq,), flags=FLAG_CLEAR_CACHE)
    back = decode_plan(encode_plan(plan))
    assert back == plan and back.clear_cache
    bad = bytearray(encode_plan(StepPlan(step=1)))
    bad[2] = 0x80  # an unknown flag bit
    with pytest.raises(PlanDecodeError, match="unknown"):
        decode_plan(bytes(bad))
