"""LoRA adapters served side by side: one batch, a per-row adapter index, tensor parallel.

mlx-lm applies an adapter by wrapping each target linear in a `LoRALinear` holding that one
adapter, so one model serves one adapter at a time, and its wrappers cannot wrap the sharded
linears of tensor parallelism. Here each target projection is wrapped once in a
`LoRAProjection` that holds every loaded adapter stacked along a slot axis:

    A: (slots, in, r)   B: (slots, r, out)   scale: (slots,)
    y = base(x) + scale[i] * ((x @ A[i]) @ B[i])     for each batch row, i = the row's slot

Slot 0 is "no adapter" (zeros), so rows with and without adapters share one forward. When no
row of a batch uses an adapter the wrappers call the base layer alone: base traffic pays
nothing. Adapters of different ranks are zero-padded to the largest rank loaded.

Under tensor parallelism each rank keeps its part, so nothing extra crosses ranks:

- column-parallel layers (q/k/v, gate/up: input whole, output split): A whole, B split along
  its output dim exactly as the base weight's rows (same segments);
- row-parallel layers (o_proj, down_proj: input split, output summed): A split along its input
  dim as the base weight's columns, B whole; the LoRA partial is added to the base partial
  before the layer's one all_sum.

The wrappers go on after `fuse_projections`: a fused q/k/v group leaves `_Part` modules at the
old paths, and the wrapper adds the LoRA term to its part of the fused output.

Adapter directories are mlx-lm's: adapter_config.json (fine_tune_type lora, lora_parameters
with scale) and adapters.safetensors with `<module path>.lora_a` (in, r) and `.lora_b` (r, out).
Layers mlx-lm wraps but the file has no weights for add zero (mlx-lm initialises lora_b to 0).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)
from mlx.utils import tree_unflatten

from mlx_cluster.models.fuse import quantized_matmul
from mlx_cluster.models.loader import ShardSpec, shard_ranges

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_ROW_PARALLEL = (ShardedToAllLinear, QuantizedShardedToAllLinear)
_COLUMN_PARALLEL = (AllToShardedLinear, QuantizedAllToShardedLinear)
_LINEAR = (nn.Linear, nn.QuantizedLinear, *_ROW_PARALLEL, *_COLUMN_PARALLEL)


class AdapterError(ValueError):
    """An adapter that cannot be served with this model; the message names the file and the numbers."""


@dataclass(frozen=True)
class Layout:
    """How one linear of the (sharded) model splits across ranks, in full (unsharded) dims."""

    kind: str  # "column" (output split), "row" (input split, summed) or "replicated"
    in_dims: int
    out_dims: int
    segments: int | list = 1  # the weight's shard segments (fused checkpoints split q|k|v each)


def linear_layouts(model: nn.Module, group, shard_specs: dict | None = None) -> dict[str, Layout]:
    """Every linear layer of a loaded model, by module path. Call it before fuse_projections."""
    size = group.size() if group is not None else 1
    specs = shard_specs or {}
    layouts = {}
    for path, module in model.named_modules():
        if not isinstance(module, _LINEAR):
            continue
        out_dims, in_dims = module["weight"].shape
        if isinstance(module, (nn.QuantizedLinear, QuantizedAllToShardedLinear, QuantizedShardedToAllLinear)):
            in_dims = in_dims * 32 // module.bits
        spec = specs.get(f"{path}.weight")
        segments = spec.segments if isinstance(spec, ShardSpec) else 1
        if size > 1 and isinstance(module, _ROW_PARALLEL):
            layouts[path] = Layout("row", in_dims * size, out_dims, segments)
        elif size > 1 and isinstance(module, _COLUMN_PARALLEL):
            layouts[path] = Layout("column", in_dims, out_dims * size, segments)
        else:
            layouts[path] = Layout("replicated", in_dims, out_dims)
    return layouts


# ---------------------------------------------------------------------------
# Reading an adapter directory
# ---------------------------------------------------------------------------


@dataclass
class AdapterWeights:
    """One adapter, read and checked against the model, cut to this rank's part."""

    path: Path
    scale: float
    rank: int
    layers: dict[str, tuple[mx.array, mx.array]]  # module path -> (A, B) of this rank
    fingerprint: str  # hex digest of the config and weights: the prefix cache keys on it


def read_adapter_config(path: Path) -> dict:
    if not path.is_dir():
        raise AdapterError(f"adapter path {path} does not exist or is not a directory")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"adapter directory {path} must hold {CONFIG_FILE} and {WEIGHTS_FILE} (mlx-lm's format)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {config_file}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} must hold a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(
            f"adapter {path} is a {kind!r} fine-tune; only LoRA adapters (fine_tune_type 'lora') can be served"
            " per request (fuse it into the model with mlx_lm.fuse instead)"
        )
    if config.get("use_dora"):
        raise AdapterError(f"adapter {path} is a DoRA adapter; only LoRA adapters can be served per request")
    return config


def read_adapter(path: str | Path, layouts: dict[str, Layout], group=None) -> AdapterWeights:
    """Read an mlx-lm LoRA adapter and keep this rank's part of each layer's A and B.

    Raises AdapterError for anything that does not fit the model: unknown layers, shapes that
    differ from the layer's, layers that are not plain linears (embeddings, MoE experts).
    """
    path = Path(path).expanduser()
    config = read_adapter_config(path)
    params = config.get("lora_parameters") or {}
    scale = float(params.get("scale", 20.0))  # mlx-lm's LoRALinear default
    try:
        weights = mx.load(str(path / WEIGHTS_FILE))
    except Exception as e:
        raise AdapterError(f"cannot read {path / WEIGHTS_FILE}: {e}") from None
    size, rank = (group.size(), group.rank()) if group is not None else (1, 0)

    modules: dict[str, dict[str, mx.array]] = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise AdapterError(f"adapter {path} has tensor {name}, which is not a LoRA lora_a / lora_b weight")
        modules.setdefault(module, {})[leaf] = value
    if not modules:
        raise AdapterError(f"adapter {path} has no LoRA weights")

    layers, ranks = {}, set()
    for module, pair in sorted(modules.items()):
        layout = layouts.get(module)
        if layout is None:
            raise AdapterError(
                f"adapter {path} adapts {module}, which is not a linear layer of this model "
                "(was it trained for another model, or on embeddings or MoE experts?)"
            )
        if set(pair) != {"lora_a", "lora_b"}:
            raise AdapterError(f"adapter {path} has only {', '.join(pair)} for {module}")
        a, b = pair["lora_a"], pair["lora_b"]
        r = a.shape[-1] if a.ndim == 2 else -1
        if a.shape != (layout.in_dims, r) or b.shape != (r, layout.out_dims):
            raise AdapterError(
                f"adapter {path} does not fit this model at {module}: lora_a is {tuple(a.shape)} and lora_b is "
                f"{tuple(b.shape)}, the layer needs ({layout.in_dims}, r) and (r, {layout.out_dims})"
            )
        ranks.add(r)
        if layout.kind == "column":
            b = _take(b, 1, shard_ranges(layout.out_dims, layout.segments, size, rank))
        elif layout.kind == "row":
            a = _take(a, 0, shard_ranges(layout.in_dims, layout.segments, size, rank))
        layers[module] = (a, b)
    mx.eval([ab for pair in layers.values() for ab in pair])
    digest = hashlib.sha256((path / CONFIG_FILE).read_bytes())
    digest.update((path / WEIGHTS_FILE).read_bytes())
    return AdapterWeights(path, scale, max(ranks), layers, digest.hexdigest())


def _take(x: mx.array, axis: int, ranges: list[tuple[int, int]]) -> mx.array:
    parts = [x[lo:hi] if axis == 0 else x[:, lo:hi] for lo, hi in ranges]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


# ---------------------------------------------------------------------------
# The per-row LoRA layer
# ---------------------------------------------------------------------------


class AdapterRows:
    """The current batch's adapter slot per row, shared by every LoRAProjection of a model.

    The batcher sets it before each forward (engine/decode.py); None means no row uses an
    adapter. A plain object, so nn.Module does not take it for parameters.
    """

    def __init__(self):
        self.index: mx.array | None = None

    def select(self, slots: list[int]) -> None:
        self.index = mx.array(slots, dtype=mx.int32) if any(slots) else None


def select_rows(model, slots: list[int]) -> None:
    """Tell a model's LoRA layers which adapter each batch row uses (no-op without adapters)."""
    rows = getattr(model, "adapter_rows", None)
    if rows is not None:
        rows.select(slots)


class LoRAProjection(nn.Module):
    """A linear layer plus every loaded adapter's low-rank term, chosen per batch row."""

    def __init__(self, base: nn.Module, kind: str, rows: AdapterRows, slots: int):
        super().__init__()
        self.base = base
        self._kind = kind
        self._rows = rows
        self._slots = slots
        self._adapters: dict[int, tuple[mx.array, mx.array, float]] = {}  # slot -> (A, B, scale)

    def set_adapter(self, slot: int, a: mx.array | None, b: mx.array | None = None, scale: float = 0.0) -> None:
        """Put (or with a=None remove) one slot's A and B, and rebuild the stacks."""
        if a is None:
            self._adapters.pop(slot, None)
        else:
            self._adapters[slot] = (a, b, scale)
        for key in ("lora_a", "lora_b", "lora_scale"):
            if key in self:
                del self[key]
        if not self._adapters:
            return
        r = max(a.shape[1] for a, _, _ in self._adapters.values())
        first_a, first_b, _ = next(iter(self._adapters.values()))
        dtype = first_a.dtype if first_a.dtype == first_b.dtype else mx.float32
        stack_a = mx.zeros((self._slots, first_a.shape[0], r), dtype=dtype)
        stack_b = mx.zeros((self._slots, r, first_b.shape[1]), dtype=dtype)
        scales = [0.0] * self._slots
        for s, (a_, b_, sc) in self._adapters.items():
            stack_a[s, :, : a_.shape[1]] = a_.astype(dtype)
            stack_b[s, : b_.shape[0], :] = b_.astype(dtype)
            scales[s] = sc
        self.lora_a, self.lora_b, self.lora_scale = stack_a, stack_b, mx.array(scales, dtype=mx.float32)
        mx.eval(self.lora_a, self.lora_b, self.lora_scale)

    def _lora(self, x: mx.array, index: mx.array) -> mx.array:
        # x: (rows, tokens, in); each row times its own slot's A, then B, as a batched matmul
        # on the rows' copies of their (small, rank-r) matrices. Not gather_mm: on CUDA (mlx
        # 0.32.4) a float32 gather_mm over a prefill chunk fails ("cuGraphAddKernelNode ...
        # invalid argument") and adapters are float32 as mlx-lm trains them. The copies cost
        # rows x in x r values per layer, a few MB per decode step of an 8B model at 32 rows.
        z = x @ self["lora_a"][index]
        z = z @ self["lora_b"][index]
        scale = self["lora_scale"][index].astype(z.dtype)  # mlx-lm: python scale * z, z's dtype
        return (scale[:, None, None] * z).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        index = self._rows.index
        if index is None or "lora_a" not in self:
            return self.base(x)
        if self._kind != "row":
            return self.base(x) + self._lora(x, index)
        # Row-parallel: the base layer's own math, with the LoRA partial added before its all_sum.
        base = self.base
        y = quantized_matmul(x, base) if isinstance(base, QuantizedShardedToAllLinear) else x @ base["weight"].T
        y = mx.distributed.all_sum(y + self._lora(x, index), group=base.group)
        return y + base["bias"] if "bias" in base else y


# ---------------------------------------------------------------------------
# The adapters of one model on one rank
# ---------------------------------------------------------------------------


class AdapterSet:
    """The adapters loaded into one model on this rank, by slot (1..slots-1; 0 is none).

    Every rank holds the same slots: loads and unloads arrive in the step plan. The wrappers go
    on lazily, on the layers some adapter targets.
    """

    def __init__(self, model: nn.Module, layouts: dict[str, Layout], group, max_adapters: int):
        self.model = model
        self.layouts = layouts
        self.group = group
        self.slots = max_adapters + 1
        self.rows = AdapterRows()
        model.adapter_rows = self.rows  # found by select_rows()
        self.loaded: dict[int, AdapterWeights] = {}
        self._wrapped: dict[str, LoRAProjection] = {}

    def read(self, path: str | Path) -> AdapterWeights:
        return read_adapter(path, self.layouts, self.group)

    def install(self, slot: int, adapter: AdapterWeights) -> None:
        """Put a read adapter into `slot` of every layer it adapts."""
        if not 0 < slot < self.slots:
            raise AdapterError(f"adapter slot {slot} is outside 1..{self.slots - 1}")
        self.remove(slot)
        self._wrap([m for m in adapter.layers if m not in self._wrapped])
        for module, (a, b) in adapter.layers.items():
            self._wrapped[module].set_adapter(slot, a, b, adapter.scale)
        self.loaded[slot] = adapter

    def remove(self, slot: int) -> None:
        adapter = self.loaded.pop(slot, None)
        if adapter is not None:
            for module in adapter.layers:
                self._wrapped[module].set_adapter(slot, None)

    def _wrap(self, modules: list[str]) -> None:
        if not modules:
            return
        current = dict(self.model.named_modules())
        wrappers = []
        for path in modules:
            wrapper = LoRAProjection(current[path], self.layouts[path].kind, self.rows, self.slots)
            self._wrapped[path] = wrapper
            wrappers.append((path, wrapper))
        self.model.update_modules(tree_unflatten(wrappers))
