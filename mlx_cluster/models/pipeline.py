"""Pipeline and hybrid (tensor x pipeline) parallelism: each rank holds a stage's layers.

Ranks are laid out stage-major: rank r is in pipeline stage ``r // T`` and is tensor rank
``r % T`` of that stage (T = tensor size), so a stage's tensor group is consecutive ranks,
which the host list puts on one machine: tensor parallel inside a host, pipeline across.

How a rank's model is cut (``prepare_stage`` then ``wire_stage``):

* it keeps the embedding, the final norm and the head (every rank computes the logits, so
  sampling stays identical everywhere), and only its stage's transformer layers, read from
  disk by the loader's partial reader (``load_model_shard(..., after_shard=...)``);
* its stage's layers are sharded like today's tensor parallelism (``model.shard``) over a
  group of the stage's T ranks;
* the first and last of its layers get a stage edge (a subclass swapped in, same
  parameters): the first takes the hidden state the previous stage sent, the last sends its
  own on and finally receives the last stage's output.

How hidden states move: one ``all_sum`` over the whole group per stage boundary, where the
sending stage's tensor rank 0 contributes the hidden state and every other rank zeros. That is
the one primitive every MLX backend has (the NCCL backend has no send/recv, and the ring
backend cannot split groups). Cost per forward pass: P all_sums of batch x tokens x hidden
values (the last one hands the final hidden state to every rank), each a ring all-reduce over
all W ranks: about 2 (W-1)/W of the bytes per rank plus W-1 link latencies. A point-to-point
send would move 1/2 of that on two ranks; on the decode sizes that matter (a few KB) latency
dominates and the difference is small.

Hybrid (T > 1 and P > 1): the ring backend cannot split the group, so a stage's tensor
all_sums also run over the whole group, with zeros from the other stages' ranks ("ghost"
reductions, issued in the same order). This is supported for layers whose only reductions
are sharded-to-all linears producing the hidden size (dense llama-style layers); others are
refused with a message.

A plain forward pass runs the stages one after the other (prefill, and decode with
``cluster.parallel.microbatches: 1``). Decode keeps every stage busy instead with micro-batches
in flight (engine/microbatch.py): during one *tick* each stage runs a different micro-batch and
all the tick's hand-offs travel in one all_sum (``Tick``), see docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

# Model attributes that mean the forward pass maps layers to caches or masks by position, which
# cutting the layer list would silently break. (llama's fa_idx / swa_idx / layer_types are
# understood and recomputed for the stage's layers: see _reindex.)
_POSITIONAL_LAYER_MAPS = ("ssm_idx", "sliding_window_pattern", "fa_idxs", "swa_idxs")


@dataclass(frozen=True)
class Layout:
    """How the world's ranks split the model: tensor x pipeline, and each stage's layers."""

    tensor: int
    pipeline: int
    stages: tuple[tuple[int, int], ...]  # [start, end) layer range of each stage
    reason: str = ""  # why this layout (for logs and `mlx-cluster plan`)

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline

    @property
    def is_pipelined(self) -> bool:
        return self.pipeline > 1

    def stage_of(self, rank: int) -> int:
        return rank // self.tensor

    def tensor_rank(self, rank: int) -> int:
        return rank % self.tensor

    def layers_of(self, rank: int) -> tuple[int, int]:
        return self.stages[self.stage_of(rank)]

    def describe(self) -> str:
        ranges = ", ".join(f"{a}-{b - 1}" for a, b in self.stages)
        return f"tensor={self.tensor} x pipeline={self.pipeline} (layers per stage: {ranges})"


@dataclass(frozen=True)
class GroupView:
    """A tensor group's rank and size, for ``model.shard()``'s slicing (no communication)."""

    rank_: int
    size_: int

    def rank(self) -> int:
        return self.rank_

    def size(self) -> int:
        return self.size_


def split_layers(num_layers: int, weights: list[float]) -> list[int]:
    """Consecutive layer counts proportional to ``weights``, each at least 1 (largest remainder)."""
    stages = len(weights)
    if num_layers < stages:
        raise ValueError(f"the model has {num_layers} layers, fewer than the {stages} pipeline stages")
    if any(w <= 0 for w in weights):
        raise ValueError("every stage needs a positive weight")
    total = sum(weights)
    exact = [w / total * num_layers for w in weights]
    counts = [max(1, int(e)) for e in exact]
    rest = [e - int(e) for e in exact]
    while sum(counts) > num_layers:  # the at-least-one rule overshot: take from the largest
        i = max((i for i in range(stages) if counts[i] > 1), key=lambda i: (counts[i], -rest[i]))
        counts[i] -= 1
    for i in sorted(range(stages), key=lambda i: (-rest[i], i))[: num_layers - sum(counts)]:
        counts[i] += 1
    return counts


def stage_ranges(counts: list[int]) -> tuple[tuple[int, int], ...]:
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return tuple(bounds)


def layout_fingerprint(fingerprint: str, layout: Layout) -> str:
    """The model fingerprint, extended with the layout when it is pipelined: the same on every
    rank (block ids must match across ranks), different for another cut of the layers (a
    rank's stored KV blocks hold its own layers only)."""
    if not layout.is_pipelined:
        return fingerprint
    text = f"{fingerprint}|tensor{layout.tensor}|stages{list(layout.stages)}"
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------
# Cutting the model
# ---------------------------------------------------------------------------


def _layer_owner(model: nn.Module) -> nn.Module:
    """The module whose ``layers`` attribute is the model's transformer layer list."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"model {type(model).__module__} has no layer list: it cannot be pipelined")
    for _, module in model.named_modules():
        # The list itself, or (mlx-lm's PipelineMixin: model.layers is a slice) the list it slices.
        own = module.get("layers")
        if own is layers or (isinstance(own, list) and len(own) >= len(layers) and any(x is layers[0] for x in own)):
            return module
    raise ValueError(f"model {type(model).__module__}: cannot find the module that owns its layers")


def check_pipelinable(model: nn.Module) -> None:
    owner = _layer_owner(model)
    for name in _POSITIONAL_LAYER_MAPS:
        if getattr(owner, name, None) is not None:
            raise ValueError(
                f"model type {type(model).__module__.rsplit('.', 1)[-1]} maps layers by position ({name}); "
                "pipeline parallelism supports models whose forward pass is a plain loop over their layers "
                "(llama, qwen2/3, qwen3_moe, mistral, deepseek_v3, ...); use cluster.parallel: {pipeline: 1}"
            )


def drop_other_layers(model: nn.Module, start: int, end: int) -> None:
    """Replace the layers outside [start, end) with empty modules, keeping the numbering
    (so the checkpoint's names still match) and freeing their (lazy) parameters."""
    layers = _layer_owner(model).layers
    if end > len(layers):
        raise ValueError(f"stage layers {start}-{end - 1} do not exist: the model has {len(layers)} layers")
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = nn.Module()


class _ZeroEmbedding(nn.Module):
    """A later stage's stand-in for the token embedding: the right shape and dtype, no weights.

    Later stages replace the embedding's output with what the previous stage sends, so with an
    untied head they need not hold (or read) the vocabulary x hidden table at all.
    """

    def __init__(self, hidden: int, dtype):
        super().__init__()
        self._shape = (hidden,)
        self._dtype = dtype

    def __call__(self, inputs: mx.array) -> mx.array:
        return mx.zeros((*inputs.shape, *self._shape), dtype=self._dtype)


def drop_embedding(model: nn.Module) -> bool:
    """On a stage after the first, replace an untied embedding with _ZeroEmbedding; True if done."""
    owner = _layer_owner(model)
    embedding = owner.get("embed_tokens") if isinstance(owner, dict) else None
    tied = "lm_head" not in model  # no head of its own: the embedding is the head (or unknown: keep it)
    if not isinstance(embedding, (nn.Embedding, nn.QuantizedEmbedding)) or tied:
        return False
    dtype = embedding.scales.dtype if isinstance(embedding, nn.QuantizedEmbedding) else embedding.weight.dtype
    hidden = embedding.weight.shape[-1] * (32 // embedding.bits if isinstance(embedding, nn.QuantizedEmbedding) else 1)
    owner.embed_tokens = _ZeroEmbedding(hidden, dtype)
    return True


def activation_dtype(model: nn.Module):
    """The hidden states' dtype, read from weights every rank holds (the final norm), so that
    every rank agrees; otherwise the first floating parameter (as the prefix cache does)."""
    from mlx.utils import tree_flatten

    norm = getattr(_layer_owner(model), "norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, mx.array) and mx.issubdtype(weight.dtype, mx.floating):
        return weight.dtype
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def _reductions(layer: nn.Module) -> list[int]:
    """Output sizes of the all_sums a tensor-sharded layer does per call (hybrid layouts)."""
    from mlx.nn.layers.distributed import QuantizedShardedToAllLinear, ShardedToAllLinear

    sizes = []
    for _, m in layer.named_modules():
        if isinstance(m, (ShardedToAllLinear, QuantizedShardedToAllLinear)):
            sizes.append(m.weight.shape[0])
    return sizes


def _retarget_groups(layer: nn.Module, group) -> None:
    """Point every sharded module of ``layer`` at ``group`` (the world: see the module docstring)."""
    for _, m in layer.named_modules():
        if hasattr(m, "group") and not isinstance(m.group, (mx.array, list, dict)):
            object.__setattr__(m, "group", group)
        elif hasattr(m, "sharding_group"):
            raise ValueError(
                f"{type(m).__name__} reduces over its own group: hybrid tensor x pipeline on a backend without "
                "group splitting supports dense layers only; use cluster.parallel: {tensor: 1} or {pipeline: 1}"
            )


@dataclass
class Tick:
    """One tick of micro-batches in flight (engine/microbatch.py), as one rank sees it.

    Stage j runs the micro-batch (decode) or prompt piece (prefill) in slot j. Every stage's
    output travels in one all_sum of a flat buffer holding every slot in slot order: each rank
    fills its own stage's slot and zeros elsewhere, so the group issues one collective per
    tick, in one order. Afterwards slot j (j < P - 1) is the input of stage j + 1 at the next
    tick; in decode, slot P - 1 is the final hidden state of the micro-batch that completes,
    whose logits every rank computes (prefill leaves it empty: nothing is sampled).
    """

    shapes: list[tuple[int, int]]  # (rows, tokens) of each slot, the same on every rank; (0, 0): empty
    hidden_in: mx.array | None  # stage > 0: this rank's input, as the previous stage sent it
    hidden: int = 0  # the hidden size (set by the exchange)
    result: mx.array | None = None  # the summed buffer, set by the stage's last layer

    def _size(self, j: int) -> int:
        rows, tokens = self.shapes[j]
        return rows * tokens * self.hidden

    def slot(self, j: int) -> mx.array | None:
        """Slot j of the summed buffer as (rows, tokens, hidden); None when empty."""
        if self.result is None or not self._size(j):
            return None
        start = sum(self._size(i) for i in range(j))
        return self.result[start : start + self._size(j)].reshape(*self.shapes[j], self.hidden)


@dataclass
class _Edges:
    """The collective schedule of one forward pass, as seen from one rank (see module docstring)."""

    group: object  # the world group
    stage: int
    pipeline: int
    sender: bool  # tensor rank 0 of its stage: contributes the stage's hidden state
    ghost_reductions: list[int] = field(default_factory=list)  # per stage: all_sums of its layers (hybrid)
    dtype: object = None  # of every hand-off: the same on every rank, or the all_sums would not match
    tick: Tick | None = None  # set while a micro-batch tick runs the model (engine/microbatch.py)
    microbatches: int = 1  # > 1: decode and prefill run as ticks (engine/microbatch.py)

    def _sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def _zeros_after(self, x: mx.array) -> mx.array:
        # Zeros that depend on x: keeps the collectives in one order and in the graph.
        return mx.depends(mx.zeros(x.shape, dtype=self.dtype), x)

    def _ghosts(self, stage: int, x: mx.array) -> mx.array:
        for _ in range(self.ghost_reductions[stage] if self.ghost_reductions else 0):
            x = self._sum(self._zeros_after(x))
        return x

    def _boundary(self, stage: int, x: mx.array, mine: bool) -> mx.array:
        contribution = x.astype(self.dtype) if mine and self.sender else self._zeros_after(x)
        return self._sum(contribution)

    def before(self, x: mx.array) -> mx.array:
        """Run the earlier stages' collectives; returns the hidden state the previous stage sent."""
        if self.tick is not None:  # it came in the previous tick's all_sum
            return self.tick.hidden_in if self.stage > 0 and self.tick.hidden_in is not None else x
        for k in range(self.stage):
            x = self._ghosts(k, x)
            x = self._boundary(k, x, mine=False)
        return x

    def after(self, h: mx.array) -> mx.array:
        """Send this stage's output, run the later stages' collectives; returns the final hidden state."""
        if self.tick is not None:
            return self._exchange(h)
        h = self._boundary(self.stage, h, mine=True)
        for k in range(self.stage + 1, self.pipeline):
            h = self._ghosts(k, h)
            h = self._boundary(k, h, mine=False)
        return h

    def _exchange(self, h: mx.array) -> mx.array:
        """A tick's one all_sum; returns the completing micro-batch's final hidden state."""
        tick = self.tick
        tick.hidden = h.shape[-1]
        parts = [
            # An empty own slot (a stand-in row ran) contributes nothing.
            h.astype(self.dtype).reshape(-1) if j == self.stage else mx.zeros((tick._size(j),), dtype=self.dtype)
            for j in range(self.pipeline)
            if tick._size(j)
        ]
        if parts:  # else no stage hands anything on (a prefill's last piece in the last stage)
            tick.result = self._sum(mx.concatenate(parts) if len(parts) > 1 else parts[0])
        last = tick.slot(self.pipeline - 1)
        return last if last is not None else mx.zeros((1, 1, tick.hidden), dtype=self.dtype)  # nothing completes


def stage_edges(model: nn.Module) -> _Edges | None:
    """The stage edges ``wire_stage`` put on this rank's layers; None if the model has none."""
    layers = getattr(model, "layers", None)  # the stage's own layers (mlx-lm models expose them)
    return getattr(layers[0], "_edges", None) if isinstance(layers, list) and layers else None


class _StageEdge:
    """Mixed into the class of a stage's first and last layer: receive before, send after."""

    _edges: _Edges
    _first: bool
    _last: bool

    def __call__(self, x, *args, **kwargs):
        if self._first:
            x = self._edges.before(x)
        out = super().__call__(x, *args, **kwargs)
        if self._last:
            if not isinstance(out, mx.array):
                raise TypeError(f"{type(self).__name__} returns {type(out).__name__}: cannot be pipelined")
            out = self._edges.after(out)
            # Prefill chunks evaluate only the caches: make them wait for the boundary
            # collectives too, or the other ranks would wait for ours forever.
            cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
            keys = getattr(cache, "keys", None)
            if isinstance(keys, mx.array):
                cache.keys = mx.depends(keys, out)
        return out


def _with_edge(layer: nn.Module, edges: _Edges, first: bool, last: bool) -> None:
    cls = type(layer)
    if not issubclass(cls, _StageEdge):
        cls = type(f"Staged{cls.__name__}", (_StageEdge, cls), {})
        layer.__class__ = cls
    object.__setattr__(layer, "_edges", edges)
    object.__setattr__(layer, "_first", first or getattr(layer, "_first", False))
    object.__setattr__(layer, "_last", last or getattr(layer, "_last", False))


def _reindex(owner: nn.Module, start: int, end: int) -> None:
    """Recompute llama-style per-position attributes for the stage's own layers: the mask is
    built from the cache of the first full-attention (and first sliding-window) layer."""
    types = getattr(owner, "layer_types", None)
    if isinstance(types, list):
        owner.layer_types = types = types[start:end]
    if getattr(owner, "fa_idx", None) is not None:
        owner.fa_idx = types.index("full_attention") if types and "full_attention" in types else 0
    if hasattr(owner, "swa_idx"):
        sliding = [i for i, layer in enumerate(owner.layers) if getattr(layer, "use_sliding", False)]
        owner.swa_idx = sliding[0] if sliding else None


def wire_stage(model: nn.Module, layout: Layout, rank: int, group) -> None:
    """Keep only this rank's layers in the model's layer list and add the stage edges.

    Hybrid layouts count the hidden-size all_sums of this rank's own layers and assume every
    stage's layers do as many (uniform dense layers; anything else is refused above).
    """
    owner = _layer_owner(model)
    start, end = layout.layers_of(rank)
    own = owner.layers[start:end]
    owner.layers = own
    _reindex(owner, start, end)
    if hasattr(owner, "num_hidden_layers"):  # some models size their cache list from it
        owner.num_hidden_layers = len(own)
    if hasattr(owner, "start_idx"):  # mlx-lm's PipelineMixin: use the whole (cut) list
        owner.start_idx, owner.end_idx = 0, None

    ghosts: list[int] = []
    if layout.tensor > 1:
        per_layer = set()
        for layer in own:
            sizes = _reductions(layer)
            _retarget_groups(layer, group)
            per_layer.add(len(sizes))
            if any(s != sizes[0] for s in sizes):
                raise ValueError("hybrid parallelism needs every reduction of a layer to be hidden-size")
        if len(per_layer) != 1:
            raise ValueError("hybrid parallelism needs the same number of reductions in every layer")
        n = per_layer.pop()
        ghosts = [n * (b - a) for a, b in layout.stages]
    dtype = activation_dtype(model)
    if isinstance(owner.get("embed_tokens"), _ZeroEmbedding):
        owner.embed_tokens._dtype = dtype
    edges = _Edges(
        dtype=dtype,
        group=group,
        stage=layout.stage_of(rank),
        pipeline=layout.pipeline,
        sender=layout.tensor_rank(rank) == 0,
        ghost_reductions=ghosts,
    )
    _with_edge(own[0], edges, first=True, last=False)
    _with_edge(own[-1], edges, first=False, last=True)
