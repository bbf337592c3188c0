"""engine/cuda_kv_attention.py's decode attention against float32 attention over the same
dequantized cache (CUDA only: the device runs it; the CPU suite checks which calls it takes here
and the routing in tests/test_kv_quant.py)."""

import logging

import mlx.core as mx
import pytest

from mlx_cluster.engine import cuda_kv_attention
from mlx_cluster.engine.kv_quant import dequantized_attention  # the kernel's stand-in on a CPU


@pytest.mark.skipif(not cuda_kv_attention.available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "context", "room", "group", "dtype"),
    [
        (8, 32, 8, 1025, 255, 64, mx.bfloat16),  # an `8b` shard's decode at batch 8
        (1, 32, 8, 7, 249, 64, mx.bfloat16),  # one short row, mostly room
        (3, 16, 2, 300, 0, 32, mx.float16),
        (2, 8, 8, 513, 255, 128, mx.bfloat16),  # no grouping
        (4, 28, 4, 200, 56, 64, mx.bfloat16),  # 7 query heads per KV head
    ],
)
def test_matches_float32_attention(batch, heads, kv_heads, context, room, group, dtype):
    q, kq, vq, mask = cuda_kv_attention.decode_case(batch, heads, kv_heads, context, room, group, dtype, batch + heads)
    assert cuda_kv_attention.fits(q, kq, mask, group, 8)
    want = cuda_kv_attention.float32_attention(q, kq, vq, mask, group)
    got = cuda_kv_attention.attend(q, kq, vq, 128**-0.5, mask, group, 8)
    assert got.shape == q.shape and got.dtype == dtype
    # float32 inside, one rounding to the output dtype (measured on an H200: at most 0.011)
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= 0.02 * max(1.0, mx.abs(want).max().item())


def test_fits_only_what_it_computes():
    q = mx.zeros((2, 32, 1, 128), mx.bfloat16)
    kq = tuple(mx.quantize(mx.zeros((2, 8, 256, 128), mx.bfloat16), group_size=64, bits=8))
    mask = mx.ones((2, 1, 1, 256), mx.bool_)
    assert cuda_kv_attention.fits(q, kq, mask, 64, 8)
    assert not cuda_kv_attention.fits(q, kq, mask, 64, 4)  # 4 bits
    assert not cuda_kv_attention.fits(mx.zeros((2, 32, 2, 128), mx.bfloat16), kq, mask, 64, 8)  # two queries
    assert not cuda_kv_attention.fits(q, kq, None, 64, 8)  # no mask array
    assert not cuda_kv_attention.fits(q, kq, mask.astype(mx.float32), 64, 8)  # an additive mask


def test_a_kernel_that_computes_anything_else_is_not_used(monkeypatch, caplog):
    """The self-check `available()` runs once per process: a kernel that computes what it should
    passes; one that computes anything else, or cannot compile or launch, is not used (decode
    steps then read the cache dequantized) and the log says why. Simulated with stand-ins."""
    check = cuda_kv_attention.self_check_passed.__wrapped__  # uncached
    monkeypatch.setattr(cuda_kv_attention, "attend", dequantized_attention)
    assert check()
    monkeypatch.setattr(cuda_kv_attention, "attend", lambda *args: mx.zeros_like(dequantized_attention(*args)))
    with caplog.at_level(logging.WARNING, logger="mlx_cluster.engine.cuda_kv_attention"):
        assert not check()
    assert "failed its self-check" in caplog.text

    def broken(*args):
        raise RuntimeError("Failed to compile kernel")

    monkeypatch.setattr(cuda_kv_attention, "attend", broken)
    with caplog.at_level(logging.WARNING, logger="mlx_cluster.engine.cuda_kv_attention"):
        assert not check()
    assert "RuntimeError: Failed to compile kernel" in caplog.text
