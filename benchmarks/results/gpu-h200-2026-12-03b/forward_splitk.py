"""8b forward time by shape, plain nn.Linear vs split-K linears (prototype)."""

import sys
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

S = int(sys.argv[1]) if len(sys.argv) > 1 else 4
model, _ = load("/tmp/mlxc-8b")


class SplitK(nn.Module):
    def __init__(self, lin, s):
        super().__init__()
        n, k = lin.weight.shape
        self.s, self.k = s, k
        self.weight = lin.weight
        self.split = mx.contiguous(lin.weight.reshape(n, s, k // s).transpose(1, 0, 2))

    def __call__(self, x):
        m = x.size // self.k
        if m == 1 or m > 16:
            return x @ self.weight.T
        xs = x.reshape(m, self.s, self.k // self.s).transpose(1, 0, 2)
        return (xs @ self.split.transpose(0, 2, 1)).sum(axis=0).reshape(*x.shape[:-1], -1)


def times(tag):
    out = []
    for b, w in ((1, 1), (1, 5), (1, 9), (8, 1), (32, 1)):
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[5] * 512] * b), cache=cache))
        x = mx.array([[7] * w] * b)
        best = 1e9
        for _ in range(4):
            t0 = time.perf_counter()
            for _ in range(10):
                mx.eval(model(x, cache=cache))
                for c in cache:
                    c.trim(w)
            best = min(best, (time.perf_counter() - t0) / 10)
        out.append(f"b{b}w{w} {best * 1e3:.2f} ms")
    print(tag, ", ".join(out), flush=True)


times("plain  ")


def patch(mod):
    for name, child in mod.children().items():
        if isinstance(child, nn.Linear) and "bias" not in child:
            setattr(mod, name, SplitK(child, S))
        elif isinstance(child, nn.Module):
            patch(child)
        elif isinstance(child, list):
            for c in child:
                if isinstance(c, nn.Module):
                    patch(c)


patch(model)
mx.eval(model.parameters())
times(f"splitK{S}")
