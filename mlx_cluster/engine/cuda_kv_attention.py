"""Decode attention over an 8-bit quantized live KV cache in one CUDA kernel.

Why (docs/benchmarks.md, "Quantized live KV", 2026-12-03): on CUDA, mlx 0.32.4's
`quantized_matmul` computes mlx-lm's grouped-query quantized attention wrongly (the keys'
broadcast over a KV head's query heads: largest error 2.5 on outputs whose largest value is 1.8,
where the same products with the heads repeated land within 0.02), and that attention takes
five kernels a layer where full precision's fused SDPA takes one; a served GPU step is
host-bound, so each launch counts. `attend` does it in one `mx.fast.cuda_kernel`: one block per
(row, KV head), its warps splitting the positions; each lane holds four of head_dim 128's values
(one packed uint32 word of keys and one of values per position), dequantizes them in registers,
and each query head of the group keeps an online softmax in float32; the warps' partial results
are combined through shared memory. On an H200, 32 layers of an `8b` shard's decode attention
(batch 8, 1,280 positions): 1.6 ms against 3.0 ms for mlx-lm's, Python building 0.30 against
0.81 ms; largest error against float32 attention 0.006-0.011 over five shapes (bfloat16 output
rounding). `kv_quant` routes a decode step here when `fits`; everything else on CUDA reads the
cache dequantized through the fused SDPA kernel. `available()` includes a one-time self-check
against that path, so a GPU where the kernel computes anything else does not serve it.
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx

log = logging.getLogger(__name__)

_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define NEG_INF (-__int_as_float(0x7f800000))
"""

_SOURCE = r"""
    constexpr int D = 128;
    constexpr int NG = D / G;  // quantization groups per row
    constexpr int U = 4;       // positions whose loads a warp issues together
    const int T = kq_shape[2];
    const int KV = kq_shape[1];
    const int H = q_shape[1];
    const int bkv = blockIdx.x;  // (row, KV head)
    const int b = bkv / KV;
    const int kvh = bkv % KV;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = (lane * 4) / G;  // this lane's group
    const float sc = static_cast<float>(scale[0]);

    float qv[R][4];
    float m[R], l[R], acc[R][4];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        const size_t base = ((size_t)b * H + kvh * R + r) * D + lane * 4;
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            qv[r][i] = static_cast<float>(q[base + i]) * sc;
            acc[r][i] = 0.f;
        }
        m[r] = NEG_INF;
        l[r] = 0.f;
    }

    const size_t row0 = (size_t)bkv * T;
    const bool* mrow = mask + (size_t)b * T;
    for (int t0 = warp; t0 < T; t0 += NW * U) {
        unsigned kw[U], vw[U];
        float ksc[U], kbi[U], vsc[U], vbi[U];
        bool ok[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * NW;
            ok[u] = t < T && mrow[t];  // the same for every lane of the warp
            const size_t r = row0 + (ok[u] ? t : 0);
            kw[u] = kq[r * 32 + lane];
            vw[u] = vq[r * 32 + lane];
            ksc[u] = static_cast<float>(ks[r * NG + g]);
            kbi[u] = static_cast<float>(kb[r * NG + g]);
            vsc[u] = static_cast<float>(vs[r * NG + g]);
            vbi[u] = static_cast<float>(vb[r * NG + g]);
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            if (!ok[u]) continue;
            float kf[4], vf[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                kf[i] = ksc[u] * (float)((kw[u] >> (8 * i)) & 255u) + kbi[u];
                vf[i] = vsc[u] * (float)((vw[u] >> (8 * i)) & 255u) + vbi[u];
            }
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                float s = qv[r][0] * kf[0] + qv[r][1] * kf[1] + qv[r][2] * kf[2] + qv[r][3] * kf[3];
                #pragma unroll
                for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                const float mn = fmaxf(m[r], s);
                const float c = __expf(m[r] - mn);
                const float p = __expf(s - mn);
                l[r] = l[r] * c + p;
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[r][i] = acc[r][i] * c + p * vf[i];
                m[r] = mn;
            }
        }
    }

    __shared__ float sm_m[NW][R];
    __shared__ float sm_l[NW][R];
    __shared__ float sm_acc[NW][R][D];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        if (lane == 0) {
            sm_m[warp][r] = m[r];
            sm_l[warp][r] = l[r];
        }
        #pragma unroll
        for (int i = 0; i < 4; ++i) sm_acc[warp][r][lane * 4 + i] = acc[r][i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < R * D; idx += NW * 32) {
        const int r = idx / D;
        const int d = idx % D;
        float M = NEG_INF;
        for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w][r]);
        float L = 0.f, A = 0.f;
        if (M > NEG_INF) {
            for (int w = 0; w < NW; ++w) {
                const float e = __expf(sm_m[w][r] - M);
                L += sm_l[w][r] * e;
                A += sm_acc[w][r][d] * e;
            }
        }
        out[((size_t)b * H + kvh * R + r) * D + d] = L > 0.f ? A / L : 0.f;
    }
"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="quantized_decode_attention",
        input_names=["q", "kq", "ks", "kb", "vq", "vs", "vb", "mask", "scale"],
        output_names=["out"],
        source=_SOURCE,
        header=_HEADER,
    )


def fits(queries, q_keys, mask, group_size: int, bits: int) -> bool:
    """Whether `attend` computes this call (else kv_quant reads the cache dequantized)."""
    B, H, L, D = queries.shape
    KV = q_keys[0].shape[1]
    return (
        bits == 8
        and D == 128
        and L == 1
        and H % KV == 0
        and H // KV <= 8
        and group_size in (32, 64, 128)
        and isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.shape == (B, 1, 1, q_keys[0].shape[2])
    )


def attend(queries, q_keys, q_values, scale: float, mask, group_size: int = 64, bits: int = 8) -> mx.array:
    """mlx-lm's `quantized_scaled_dot_product_attention` for a decode step, in one kernel (its
    signature; `bits` is 8, as `fits` requires)."""
    B, H, _, D = queries.shape
    KV = q_keys[0].shape[1]
    R = H // KV
    warps = min(16, 64 // R)  # the shared-memory combine holds warps x R x 128 floats (32 KB)
    return _kernel()(
        inputs=[queries, *q_keys, *q_values, mask, mx.array([scale], dtype=mx.float32)],
        template=[("NW", warps), ("G", group_size), ("R", R)],
        grid=(B * KV * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[queries.dtype],
    )[0]


def available() -> bool:
    """Whether this process computes on a CUDA GPU (the kernel's only backend) and the kernel
    passed its self-check there (once per process, at the start-up probe's first decode)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available() and self_check_passed()


@functools.cache
def self_check_passed() -> bool:
    """The kernel against the fused SDPA kernel over the same dequantized cache on a small
    grouped-query case with left padding and masked room: a GPU or driver where it computes
    anything else (checked on an H200 only) falls back to the dequantized reads, with a warning,
    rather than serving wrong attention."""
    try:
        error, scale = _self_check_error()
    except Exception as e:  # a kernel that does not compile or launch here
        log.warning(
            "CUDA decode attention unavailable (%s: %s); decode steps read the cache dequantized", type(e).__name__, e
        )
        return False
    if error > 0.02 * max(1.0, scale):
        log.warning(
            "CUDA decode attention failed its self-check (largest error %.4f on outputs up to %.2f); "
            "decode steps read the cache dequantized",
            error,
            scale,
        )
        return False
    return True


def _self_check_error() -> tuple[float, float]:
    """(largest error of `attend` against float32 attention, largest output) on a small case."""
    q, kq, vq, mask = decode_case(
        rows=2, heads=8, kv_heads=2, context=200, room=56, group=64, dtype=mx.bfloat16, seed=0
    )
    want = float32_attention(q, kq, vq, mask, 64)
    got = attend(q, kq, vq, 128**-0.5, mask, 64, 8).astype(mx.float32)
    return mx.abs(got - want).max().item(), mx.abs(want).max().item()


def decode_case(rows: int, heads: int, kv_heads: int, context: int, room: int, group: int, dtype, seed: int):
    """A random decode step over an 8-bit head_dim-128 cache: (queries, key triple, value triple,
    mask), rows left-padded by different amounts and `room` unused positions masked, as a
    contiguous-reads batch hands them to attention (the self-check, the device test, the benchmark)."""
    key = mx.random.key(seed)

    def normal(shape):  # the draws of mx.random.seed(seed), without touching the global seed
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.normal(shape, key=sub)

    positions = context + room
    q = normal((rows, heads, 1, 128)).astype(dtype)
    k = (normal((rows, kv_heads, positions, 128)) * 2).astype(dtype)
    v = normal((rows, kv_heads, positions, 128)).astype(dtype)
    padding = mx.array([(i * 37) % 64 for i in range(rows)])
    pos = mx.arange(positions)
    mask = ((pos[None] >= padding[:, None]) & (pos[None] < context))[:, None, None, :]
    kq, vq = (tuple(mx.quantize(x, group_size=group, bits=8)) for x in (k, v))
    return q, kq, vq, mask


def float32_attention(q, kq, vq, mask, group: int) -> mx.array:
    """The attention `attend` approximates: float32 over the cache dequantized (scale 128^-1/2)."""
    keys, values = (mx.dequantize(*x, group_size=group, bits=8).astype(mx.float32) for x in (kq, vq))
    return mx.fast.scaled_dot_product_attention(q.astype(mx.float32), keys, values, scale=128**-0.5, mask=mask)
