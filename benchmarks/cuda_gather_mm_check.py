"""Is mlx's `gather_mm` right on this device? The products mlx-lm's MoE layers (SwitchGLU) run:
rows of one token each (M = 1) against the expert chosen per row, with the rows sorted by expert
(`sorted_indices=True`, which mlx-lm uses once a batch has >= 64 token-expert pairs) or not.

Prints, per case, the largest difference from a float32 reference product row by row, next to the
largest reference value. Run on a CUDA device: `python3 benchmarks/cuda_gather_mm_check.py`.
"""

import mlx.core as mx


def check(experts: int, rows: int, k: int, n: int, dtype, sort: bool, seed: int = 0) -> tuple[float, float]:
    keys = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.normal((rows, 1, k), key=keys[0]).astype(dtype)
    w = (mx.random.normal((experts, n, k), key=keys[1]) / k**0.5).astype(dtype)  # mlx-lm's layout
    idx = mx.random.randint(0, experts, (rows,), key=keys[2]).astype(mx.uint32)
    if sort:
        idx = mx.sort(idx)
    got = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort).astype(mx.float32)
    # The reference gathers each row's expert in chunks: one gather of rows x n x k elements past
    # 2^32 computes wrong values on CUDA (mlx 0.32.4), which first read as a wrong gather_mm here.
    want = mx.concatenate(
        [
            x[i : i + 32].astype(mx.float32) @ w[idx[i : i + 32]].astype(mx.float32).swapaxes(-1, -2)
            for i in range(0, rows, 32)
        ]
    )
    return mx.abs(got - want).max().item(), mx.abs(want).max().item()


# (in, out) of expert projections: Qwen3-30B-A3B's gate/up and down, DeepSeek-V3's gate/up,
# Mixtral's gate/up and down
SHAPES = [(2048, 768), (768, 2048), (7168, 2048), (4096, 14336), (14336, 4096)]


def main() -> None:
    print(f"device {mx.default_device()}")
    cases = [
        (d, e, r, s, SHAPES[0])
        for d in (mx.bfloat16, mx.float16, mx.float32)
        for e in (1, 8, 128)
        for r in (2, 64, 512)
        for s in (True, False)
    ]
    cases += [
        (mx.bfloat16, e, r, s, shape)
        for shape in SHAPES[1:]
        for e in (1, 8)
        for r in (2, 64, 512)
        for s in (True, False)
    ]
    for dtype, experts, rows, sort, (k, n) in cases:
        what = f"{dtype} {k}->{n} experts={experts} rows={rows} sorted={sort}"
        try:
            err, top = check(experts, rows, k, n, dtype, sort)
            verdict = "ok" if err <= 0.05 * max(1.0, top) else "WRONG"
            print(f"{what}: err {err:.3g} (outputs up to {top:.3g}) {verdict}", flush=True)
        except Exception as e:
            print(f"{what}: failed {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    main()
