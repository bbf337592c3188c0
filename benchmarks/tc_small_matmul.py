"""Prototype, not in the serving path: products of a few rows on NVIDIA tensor cores,
without cuBLAS's per-call host cost. Measured, it loses (docs/benchmarks.md, "A tensor-core
small-row product"); kept so that the next attempt starts from working, tested code.

Why it was tried: a decode step of a small batch, or a speculative verify of K+1 tokens,
multiplies 2-32 rows of activations by every weight matrix. MLX on CUDA runs one row through
its own gemv, but from two rows up it calls cuBLAS, and each cuBLAS product costs 15-30 us of
host time to encode against ~5 us for the gemv. A GPU decode step is host-bound, so a verify
of any width cost ~1.5 plain steps and speculation could not pay.

`small_matmul(x, w)` computes x @ w.T with one `mx.fast.cuda_kernel` (`mma.sync` m16n8k16,
float32 accumulation), each weight read once for all rows:

* a block of KSPLIT warps owns 8 * NT output columns; its warps split K and add their partial
  sums through shared memory at the end;
* each lane loads 16 contiguous bytes of a weight row and of an activation row per 32-wide
  slice of K. The mma fragments want a different order of k inside the slice; a dot product
  does not care about the order of its terms, so activations and weights are fed in the same
  permuted order (lane group q holds k = 8q .. 8q+7, and step s of the two mma steps per slice
  takes k = 8q+4s .. 8q+4s+3), which keeps every load a single 16-byte read;
* rows past M (up to 16 * MT) are zeros.

What the H200 showed: results agree with cuBLAS to bf16 rounding and the kernel encodes in
5-10 us, but its device time is 1.3-1.7x cuBLAS's on the large matrices (gate/up, LM head) and
the whole forward got slower at every width and batch. Reaching the weight-bandwidth floor
needs a deeper load pipeline (cp.async into shared memory, ldmatrix), not more unrolling.

`enable(model)` routes a loaded model's dense products through it (benchmarks only).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_cluster.models.fuse import FusedProjection  # noqa: E402

MAX_ROWS = 32

_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// d += a (16 x 16, row) * b (16 x 8, col), float32 accumulators; a and b as bf16 or fp16 pairs.
template <bool BF16>
__device__ __forceinline__ void mma_16816(
    float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
"""

_SOURCE = r"""
    const int M = x_shape[0];
    const int N = w_shape[0];
    const int K = w_shape[1];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;  // mma group: an activation row, a weight row (output column)
    const int q = lane & 3;   // which 8 of a 32-wide slice of K this lane loads
    const int n_base = blockIdx.x * (8 * NT);
    const uint4 zero = make_uint4(0, 0, 0, 0);

    const uint4* w_row[NT];
    bool w_ok[NT];
    #pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int n = n_base + 8 * j + g;
        w_ok[j] = n < N;
        w_row[j] = reinterpret_cast<const uint4*>(w + (size_t)(w_ok[j] ? n : 0) * K) + q;
    }
    const uint4* x_row[2 * MT];
    bool x_ok[2 * MT];
    #pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        const int r = 16 * (i >> 1) + 8 * (i & 1) + g;
        x_ok[i] = r < M;
        x_row[i] = reinterpret_cast<const uint4*>(x + (size_t)(x_ok[i] ? r : 0) * K) + q;
    }

    float acc[MT][NT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int j = 0; j < NT; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

    // Each warp takes U consecutive 32-wide slices of K at a time, every load issued before
    // the first mma so that U * (NT + 2 * MT) 16-byte reads per lane are in flight at once:
    // the product is bound by how many weight bytes are on their way, not by arithmetic.
    const int slices = K >> 5;
    for (int c0 = warp * U; c0 < slices; c0 += KSPLIT * U) {
        uint4 wv[U][NT];
        uint4 xv[U][2 * MT];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool in = c0 + u < slices;
            #pragma unroll
            for (int j = 0; j < NT; ++j) wv[u][j] = in && w_ok[j] ? __ldcs(w_row[j] + 4 * (c0 + u)) : zero;
            #pragma unroll
            for (int i = 0; i < 2 * MT; ++i) xv[u][i] = in && x_ok[i] ? __ldg(x_row[i] + 4 * (c0 + u)) : zero;
        }
        #pragma unroll
        for (int u = 0; u < U; ++u)
            #pragma unroll
            for (int s = 0; s < 2; ++s)
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const unsigned* lo = reinterpret_cast<const unsigned*>(&xv[u][2 * mt]);
                    const unsigned* hi = reinterpret_cast<const unsigned*>(&xv[u][2 * mt + 1]);
                    #pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const unsigned* b = reinterpret_cast<const unsigned*>(&wv[u][j]);
                        mma_16816<BF16>(acc[mt][j], lo[2 * s], hi[2 * s], lo[2 * s + 1], hi[2 * s + 1], b[2 * s], b[2 * s + 1]);
                    }
                }
    }

    if constexpr (KSPLIT > 1) {
        __shared__ float partial[KSPLIT > 1 ? KSPLIT - 1 : 1][MT * NT * 4][32];
        if (warp > 0) {
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int j = 0; j < NT; ++j)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) partial[warp - 1][(mt * NT + j) * 4 + e][lane] = acc[mt][j][e];
        }
        __syncthreads();
        if (warp > 0) return;
        for (int w2 = 0; w2 < KSPLIT - 1; ++w2)
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int j = 0; j < NT; ++j)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][j][e] += partial[w2][(mt * NT + j) * 4 + e][lane];
    }

    // C fragment: lane holds rows g and g + 8, columns 2q and 2q + 1 of each 16 x 8 tile.
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int col = n_base + 8 * j + 2 * q;
            if (col >= N) continue;
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * mt + 8 * h + g;
                if (r >= M) continue;
                const float v0 = acc[mt][j][2 * h], v1 = acc[mt][j][2 * h + 1];
                if constexpr (BF16) {
                    *reinterpret_cast<__nv_bfloat162*>(out + (size_t)r * N + col) = __floats2bfloat162_rn(v0, v1);
                } else {
                    *reinterpret_cast<__half2*>(out + (size_t)r * N + col) = __floats2half2_rn(v0, v1);
                }
            }
        }
"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="small_rows_matmul", input_names=["x", "w"], output_names=["out"], source=_SOURCE, header=_HEADER
    )


def layout(n: int, k: int) -> tuple[int, int]:
    """(NT, KSPLIT): 8 * NT columns per block, KSPLIT warps splitting K. The fastest of the
    M = 8 sweep on an H200 (`cuda_small_matmul.py --sweep`, results/gpu-h200-2026-12-03d); the
    whole-forward measurements there ran with earlier choices (2, 4) / (1, 4) / (1, 8)."""
    if n >= 16384:
        return 1, 8
    return 4, 2 if k < 8192 else 4


@functools.lru_cache(maxsize=1024)
def _launch(m: int, n: int, k: int, dtype: mx.Dtype, nt: int, ksplit: int, unroll: int) -> dict:
    """The kernel call's arguments for one shape, built once: a decode step calls it ~130 times."""
    blocks = (n + 8 * nt - 1) // (8 * nt)
    return {
        "template": [
            ("NT", nt),
            ("KSPLIT", ksplit),
            ("U", unroll),
            ("MT", (m + 15) // 16),
            ("BF16", dtype == mx.bfloat16),
        ],
        "grid": (blocks * ksplit * 32, 1, 1),
        "threadgroup": (ksplit * 32, 1, 1),
        "output_shapes": [(m, n)],
        "output_dtypes": [dtype],
    }


def small_matmul(
    x: mx.array, w: mx.array, nt: int | None = None, ksplit: int | None = None, unroll: int = 4
) -> mx.array:
    """x (M, K) @ w (N, K).T on the tensor cores; M <= MAX_ROWS (see `fits`)."""
    (m, k), n = x.shape, w.shape[0]
    if nt is None or ksplit is None:
        nt, ksplit = layout(n, k)
    return _kernel()(inputs=[x, w], **_launch(m, n, k, x.dtype, nt, ksplit, unroll))[0]


def fits(x: mx.array, w: mx.array) -> bool:
    """Whether `small_matmul` takes x @ w.T (both on this process's CUDA device)."""
    rows = x.size // x.shape[-1] if x.ndim else 0
    return (
        2 <= rows <= MAX_ROWS
        and x.dtype == w.dtype
        and x.dtype in (mx.bfloat16, mx.float16)
        and w.ndim == 2
        and w.shape[1] == x.shape[-1]
        and w.shape[1] % 32 == 0
        and w.shape[0] % 8 == 0
    )


def matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T, through `small_matmul` where it fits, else MLX's own product."""
    if _ENABLED and fits(x, w):
        lead = x.shape[:-1]
        return small_matmul(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])
    return x @ w.T


class SmallRowsLinear(nn.Linear):
    """nn.Linear whose product goes through `matmul_t` (same parameters, same checkpoints)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul_t(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class SmallRowsEmbedding(nn.Embedding):
    """nn.Embedding whose tied output head (`as_linear`) goes through `matmul_t`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return matmul_t(x, self["weight"])


class SmallRowsFused(FusedProjection):
    """A fused q/k/v or gate/up projection (models/fuse.py) whose product goes through `matmul_t`."""

    def __call__(self, x: mx.array) -> mx.array:
        return matmul_t(x, self["weight"])


_ENABLED = False


def available() -> bool:
    """A CUDA GPU is the default device."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def enable(model: nn.Module) -> int:
    """Route `model`'s plain dense linears and fused projections (not quantized, not sharded)
    and tied output heads through `matmul_t`; returns how many linears were switched. Does
    nothing off CUDA."""
    global _ENABLED
    if not available():
        return 0
    _ENABLED = True
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallRowsLinear
            switched += 1
        elif type(module) is nn.Embedding:
            module.__class__ = SmallRowsEmbedding
        elif type(module) is FusedProjection and not module.quantized and "bias" not in module:
            module.__class__ = SmallRowsFused
    return switched
