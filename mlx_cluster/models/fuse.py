"""Fewer kernels per layer: one matmul for q/k/v and one for gate/up.

A decode step on a GPU is host-bound: MLX spends microseconds of host time per kernel, so a
step costs its kernel count, not its bytes (docs/architecture.md). Attention's q, k and v
projections read the same input, and so do an MLP's gate and up projections; concatenating
their weights (output rows; for quantized layers the scales and biases too) turns three
matmuls into one, and two into one.

The model's own code is left alone. Each projection is replaced by a `_Part` that returns its
columns of the fused output, computed once for a given input: mlx-lm's attention still calls
`q_proj(x)`, `k_proj(x)`, `v_proj(x)`, and the first call does the work for all three. Under
tensor parallelism these projections are all-to-sharded (input replicated, output split), so a
rank fuses its own shards and nothing crosses ranks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

GROUPS = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}
_DENSE = (nn.Linear, AllToShardedLinear)
_QUANTIZED = (nn.QuantizedLinear, QuantizedAllToShardedLinear)


class _Memo:
    """The fused output for the input it was computed from, until every part has taken its slice.
    A plain object, so nn.Module does not mistake it for parameters."""

    def __init__(self, fused: FusedProjection, bounds: list[tuple[int, int]]):
        self.fused = fused
        self.bounds = bounds
        self.x = None
        self.y = None
        self.pending = 0

    def take(self, x: mx.array, index: int) -> mx.array:
        if x is not self.x:
            self.x, self.y, self.pending = x, self.fused(x), len(self.bounds)
        start, stop = self.bounds[index]
        out = self.y[..., start:stop]
        self.pending -= 1
        if self.pending <= 0:  # every part served: do not keep activations alive
            self.x = self.y = None
        return out


class _Part(nn.Module):
    """Stands in for one fused projection: its slice of the shared output."""

    def __init__(self, memo: _Memo, index: int):
        super().__init__()
        self._memo = memo
        self._index = index

    def __call__(self, x: mx.array) -> mx.array:
        return self._memo.take(x, self._index)


def quantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """x times a quantized layer's weight (transposed), without its bias."""
    return mx.quantized_matmul(
        x,
        layer["weight"],
        scales=layer["scales"],
        biases=layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class FusedProjection(nn.Module):
    """Several projections of one input as one matmul (dense or quantized, optional bias)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        first = parts[0]
        self.weight = mx.concatenate([p["weight"] for p in parts], axis=0)
        self.quantized = isinstance(first, _QUANTIZED)
        if self.quantized:
            self.group_size, self.bits, self.mode = first.group_size, first.bits, first.mode
            self.scales = mx.concatenate([p["scales"] for p in parts], axis=0)
            if "biases" in first:
                self.biases = mx.concatenate([p["biases"] for p in parts], axis=0)
        if "bias" in first:
            self.bias = mx.concatenate([p["bias"] for p in parts], axis=0)

    def __call__(self, x: mx.array) -> mx.array:
        if self.quantized:
            y = quantized_matmul(x, self)
            return y + self["bias"] if "bias" in self else y
        if "bias" in self:
            return mx.addmm(self["bias"], x, self["weight"].T)
        return x @ self["weight"].T


def _fusable(parts: list) -> bool:
    first = parts[0]
    if not all(type(p) is type(first) for p in parts) or not isinstance(first, _DENSE + _QUANTIZED):
        return False
    if any(("bias" in p) != ("bias" in first) or ("biases" in p) != ("biases" in first) for p in parts):
        return False
    if isinstance(first, _QUANTIZED) and any(
        (p.bits, p.group_size, p.mode) != (first.bits, first.group_size, first.mode) for p in parts
    ):
        return False
    return len({p["weight"].shape[1] for p in parts}) == 1 and all(
        p["weight"].dtype == first["weight"].dtype for p in parts
    )


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of plain (or quantized, or all-to-sharded) linears in
    `model`, in place; returns how many groups were fused. Others (MoE experts, LoRA layers,
    MLA attention) are left as they are."""
    targets = []
    for _, module in model.named_modules():
        for names in GROUPS:
            parts = [module.get(n) if isinstance(module, dict) else None for n in names]
            if all(isinstance(p, nn.Module) for p in parts) and _fusable(parts):
                targets.append((module, names, parts))
    for module, names, parts in targets:
        fused = FusedProjection(parts)
        widths = [p["weight"].shape[0] for p in parts]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        memo = _Memo(fused, [(s, s + w) for s, w in zip(starts, widths)])
        module[GROUPS[names]] = fused
        for i, name in enumerate(names):
            module[name] = _Part(memo, i)
        # Materialize now, one group at a time: the originals are freed as we go, so peak
        # memory grows by one group, not by the whole model.
        mx.eval(fused.parameters())
    return len(targets)
