"""Small-M bf16 matmuls on CUDA: what a verify step (width K+1) or a small decode batch pays.

For each of the `8b` preset's fused projection shapes and M = 1, 2, 5, 8, 9 rows, prints the
time per product (50 queued, then evaluated) and the host time spent encoding it, for:

  cublas    `x @ w.T`, what the model runs (mlx's gemv at M = 1, cuBLAS above)
  skinny    a CUDA kernel (mx.fast.cuda_kernel) that reads each weight once for all M rows
  tc        tc_small_matmul.py: the same idea on the tensor cores (mma.sync), a prototype
  splitK S  K split in S slices, a batched product, then a sum (--split-k)
  wx^T      the transposed product (--split-k)
  gather    mx.gather_mm with every row on one weight, sorted (--gather): mlx's CUTLASS grouped
            GEMM, one kernel node instead of a cuBLAS call
  bgemv     the rows as a batch of M=1 products on a strided view (--gather): mlx's gemv per
            row, the weight read once per row

Findings on an H200 (docs/benchmarks.md, "Small matmuls on CUDA"): cuBLAS's path costs 15-28 us
of host encoding per product at M >= 2 against ~6 at M = 1; the skinny kernel encodes in ~6 us
but its FMAs (no tensor cores) make it slower than cuBLAS on the large shapes; split-K and the
transposed product are slower everywhere. Needs a CUDA device:

    python3 benchmarks/cuda_small_matmul.py [--skinny] [--split-k] [--gather] [--sweep]

--sweep times small_matmul's block layouts (columns per block, warps splitting K) at M = 8.
"""

import functools
import sys
import time

import mlx.core as mx
from tc_small_matmul import layout, small_matmul

HEADER = "#include <cuda_bf16.h>\n"
SOURCE = r"""
    // out (M_ROWS, N) = x (M_ROWS, K) @ w (N, K)^T; one warp computes COLS columns for every row,
    // reading each weight once (16 bytes per lane per load, coalesced along K).
    constexpr int COLS = 4;
    constexpr int K8 = K / 8;
    const int lane = threadIdx.x & 31;
    const int n0 = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * COLS;
    if (n0 >= N) return;
    float acc[M_ROWS][COLS];
    #pragma unroll
    for (int m = 0; m < M_ROWS; ++m)
        #pragma unroll
        for (int c = 0; c < COLS; ++c) acc[m][c] = 0.f;
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    for (int k = lane; k < K8; k += 32) {
        uint4 xv[M_ROWS];
        #pragma unroll
        for (int m = 0; m < M_ROWS; ++m) xv[m] = x4[m * K8 + k];
        #pragma unroll
        for (int c = 0; c < COLS; ++c) {
            if (n0 + c < N) {
                uint4 wv = w4[(size_t)(n0 + c) * K8 + k];
                const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv);
                float2 wf[4];
                #pragma unroll
                for (int j = 0; j < 4; ++j) wf[j] = __bfloat1622float2(wh[j]);
                #pragma unroll
                for (int m = 0; m < M_ROWS; ++m) {
                    const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv[m]);
                    float s = 0.f;
                    #pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        float2 xf = __bfloat1622float2(xh[j]);
                        s += xf.x * wf[j].x + xf.y * wf[j].y;
                    }
                    acc[m][c] += s;
                }
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < M_ROWS; ++m)
        #pragma unroll
        for (int c = 0; c < COLS; ++c) {
            float v = acc[m][c];
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffff, v, off);
            if (lane == 0 && n0 + c < N) out[m * N + n0 + c] = __float2bfloat16(v);
        }
"""


@functools.cache
def skinny_kernel():
    return mx.fast.cuda_kernel(
        name="skinny_gemm", input_names=["x", "w"], output_names=["out"], source=SOURCE, header=HEADER
    )


def skinny(x, w):
    kernel = skinny_kernel()
    m, k = x.shape
    n = w.shape[0]
    warps = (n + 3) // 4
    return kernel(
        inputs=[x, w],
        template=[("M_ROWS", m), ("N", n), ("K", k)],
        grid=(warps * 32, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[mx.bfloat16],
    )[0]


def timeit(f, reps=50):
    for _ in range(3):
        mx.eval(f())
    best = enc = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        ys = [f() for _ in range(reps)]
        t1 = time.perf_counter()
        mx.async_eval(ys)
        t2 = time.perf_counter()
        mx.eval(ys)
        best = min(best, (time.perf_counter() - t0) / reps)
        enc = min(enc, (t2 - t1) / reps)
    return best * 1e6, enc * 1e6


SHAPES = {
    "qkv 6144x4096": (6144, 4096),
    "o 4096x4096": (4096, 4096),
    "gate_up 28672x4096": (28672, 4096),
    "down 4096x14336": (4096, 14336),
    "lm_head 32000x4096": (32000, 4096),
}


def max_error(y: mx.array, ref: mx.array) -> float:
    return mx.abs(y.astype(mx.float32) - ref.astype(mx.float32)).max().item()


def row(w: mx.array, m: int, split_k: bool) -> str:
    n, k = w.shape
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    mx.eval(x)
    ref = x @ w.T
    if m >= 2:
        tc = timeit(lambda: small_matmul(x, w))
        tc_s = f"   tc {tc[0]:.1f} / {tc[1]:.1f} (err {max_error(small_matmul(x, w), ref):.2g})"
    else:
        tc_s = ""
    sk_s = ""
    try:
        if "--skinny" in sys.argv:
            err = max_error(skinny(x, w), ref)
            sk = timeit(lambda: skinny(x, w))
            sk_s = f"skinny {sk[0]:.1f} / {sk[1]:.1f} (err {err:.2g})"
    except Exception as e:  # a kernel that does not compile here is a finding too
        sk_s = f"skinny failed: {str(e)[:300]}"
    pl = timeit(lambda: x @ w.T)
    line = f"  M={m}: cublas {pl[0]:.1f} / {pl[1]:.1f}{tc_s}   {sk_s}"
    if "--gather" in sys.argv:
        line += "   " + gather_cells(x, w, ref)
    if split_k:
        line += f"\n        wx^T {timeit(lambda: (w @ x.T).T)[0]:.1f}"
        for s in (2, 4, 8):
            ws = mx.contiguous(w.reshape(n, s, k // s).transpose(1, 0, 2))  # (S, N, K/S)
            xs = x.reshape(m, s, k // s).transpose(1, 0, 2)  # (S, M, K/S)
            line += f"  splitK{s} {timeit(lambda ws=ws, xs=xs: (xs @ ws.transpose(0, 2, 1)).sum(axis=0))[0]:.1f}"
    return line


def gather_cells(x: mx.array, w: mx.array, ref: mx.array) -> str:
    """The two routes around cuBLAS that mlx itself offers (see the docstring)."""
    m, k = x.shape
    rows = mx.zeros((m,), dtype=mx.uint32)
    wt = w.T[None]  # (1, K, N), a transposed view

    def gather():
        return mx.gather_mm(x[:, None, :], wt, rhs_indices=rows, sorted_indices=True).reshape(m, -1)

    def bgemv():  # strides (K, 1, 1): read as a transposed (1, K) matrix, so never merged into M
        return (mx.as_strided(x, (m, 1, k), (k, 1, 1)) @ w.T).reshape(m, -1)

    cells = []
    for name, f in (("gather", gather), ("bgemv", bgemv)):
        try:
            err = max_error(f(), ref)
            t = timeit(f)
            cells.append(f"{name} {t[0]:.1f} / {t[1]:.1f} (err {err:.2g})")
        except Exception as e:  # no CUDA route for this shape in this mlx: a finding too
            cells.append(f"{name} failed: {str(e)[:160]}")
    return "  ".join(cells)


def sweep() -> None:
    for name, (n, k) in SHAPES.items():
        w = mx.random.normal((n, k)).astype(mx.bfloat16) * 0.02
        x = mx.random.normal((8, k)).astype(mx.bfloat16)
        mx.eval(w, x)
        ref = x @ w.T
        cells = []
        for nt in (1, 2, 4):
            for ksplit in (2, 4, 8):
                for u in (4, 8):
                    f = lambda x=x, w=w, nt=nt, ksplit=ksplit, u=u: small_matmul(x, w, nt, ksplit, u)  # noqa: E731
                    err = max_error(f(), ref)
                    cells.append(f"nt{nt}/k{ksplit}/u{u} {timeit(f)[0]:.1f}" + ("" if err < 0.1 else f" ERR {err:.2g}"))
        print(f"{name} M=8 (chosen {layout(n, k)}): " + "  ".join(cells), flush=True)


def build_cost() -> None:
    """Python time to build one product's graph (no evaluation), per call."""
    import tc_small_matmul as sm

    w = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    x = mx.random.normal((1, 5, 4096)).astype(mx.bfloat16)
    x2 = x.reshape(5, 4096)
    mx.eval(w, x, x2)
    sm._ENABLED = True
    for name, f in (
        ("x @ w.T", lambda: x2 @ w.T),
        ("small_matmul", lambda: sm.small_matmul(x2, w)),
        ("matmul_t (3-d x)", lambda: sm.matmul_t(x, w)),
        ("fits", lambda: sm.fits(x, w)),
    ):
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(500):
                f()
            best = min(best, (time.perf_counter() - t0) / 500)
        print(f"build {name}: {best * 1e6:.2f} us per call", flush=True)


def main() -> None:
    build_cost()
    if "--sweep" in sys.argv:
        return sweep()
    for name, (n, k) in SHAPES.items():
        w = mx.random.normal((n, k)).astype(mx.bfloat16) * 0.02
        mx.eval(w)
        print(f"{name} floor {n * k * 2 / 4.8e9 * 1e3:.1f} us  (total us per op, host encode us per op)", flush=True)
        for m in (1, 2, 5, 8, 9, 16, 32):
            print(row(w, m, "--split-k" in sys.argv), flush=True)


if __name__ == "__main__":
    main()
