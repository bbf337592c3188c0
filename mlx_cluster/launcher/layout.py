"""Which rank holds what: the tensor x pipeline layout, uneven stages, and the `auto` cost model.

Pure functions of the config, the model's config.json and its safetensors headers (plus, for
`parallel: auto`, link numbers measured at start-up), so `mlx-cluster plan` prints exactly what
`up` will do without starting anything, and every rank computes the same layout on its own.

Stages and hosts: rank r is in stage r // T. A stage belongs to the host of its first rank.
`hosts[].layers` gives the layers the stages on that host hold in all (split evenly between
them); `hosts[].memory_gb` gives the host's share instead (layers in proportion to memory).
Without either, layers are split as evenly as possible, earlier stages taking the remainder.

The `auto` cost model (per decode step of B sequences, B = min(8, max_batch_size)):

    step(T, P) = C / T + n(T, P) * (alpha + m / bandwidth)
    n(T, P)    = 2 L [T > 1]  +  P [P > 1]     (all_sums per forward pass)
    m          = B * hidden * 4 bytes           (one hidden state per sequence)

C is one rank's time for the whole model's weights (bytes / a measured matmul rate), alpha and
bandwidth come from timed all_sums over the group. Stages run one after the other (no
micro-batches in flight), so a pipeline does not divide C; it only trades 2L reductions for P
transfers. Layouts whose tensor size does not divide the heads are skipped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_cluster.models.pipeline import Layout, split_layers, stage_ranges

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DECODE_BATCH = 8


class LayoutError(ValueError):
    """No layout fits: the message names the key to change and gives the numbers."""


# ---------------------------------------------------------------------------
# Config checks (no model needed)
# ---------------------------------------------------------------------------


def parallel_sizes(config, world_size: int) -> tuple[int, int] | None:
    """(tensor, pipeline) from cluster.parallel; None for auto. Raises LayoutError naming the key."""
    parallel = config.cluster.parallel
    if parallel == "auto":
        return None
    if parallel is None:
        return world_size, 1
    tensor, pipeline = parallel.tensor, parallel.pipeline
    if tensor is None and pipeline is None:
        raise LayoutError("cluster.parallel: give tensor:, pipeline: or both (or write parallel: auto)")
    if tensor is None:
        tensor = world_size // pipeline if world_size % pipeline == 0 else 0
    if pipeline is None:
        pipeline = world_size // tensor if world_size % tensor == 0 else 0
    if tensor * pipeline != world_size:
        raise LayoutError(
            f"cluster.parallel: tensor x pipeline must equal the {world_size} ranks of hosts: "
            f"(got tensor={parallel.tensor}, pipeline={parallel.pipeline}); "
            f"e.g. {{tensor: 1, pipeline: {world_size}}}"
        )
    return tensor, pipeline


def _rank_hosts(config) -> list[int]:
    return [i for i, h in enumerate(config.host_list()) for _ in range(h.ranks)]


def stage_hosts(config, tensor: int, pipeline: int) -> list[int]:
    """Index (in hosts:) of the host of each stage's first rank."""
    ranks = _rank_hosts(config)
    return [ranks[s * tensor] for s in range(pipeline)]


def check_parallel_config(config) -> None:
    """Checks that need only the config (run when it is loaded); raises ValueError naming the key."""
    hosts = config.host_list()
    sizes = parallel_sizes(config, sum(h.ranks for h in hosts))
    with_layers = [i for i, h in enumerate(hosts) if h.layers is not None]
    if with_layers and len(with_layers) != len(hosts):
        missing = next(i for i, h in enumerate(hosts) if h.layers is None)
        raise LayoutError(f"hosts.{missing}.layers: give layers: for every host or for none")
    with_memory = [i for i, h in enumerate(hosts) if h.memory_gb is not None]
    if with_memory and len(with_memory) != len(hosts):
        missing = next(i for i, h in enumerate(hosts) if h.memory_gb is None)
        raise LayoutError(f"hosts.{missing}.memory_gb: give memory_gb: for every host or for none")
    if sizes is not None:
        check_microbatches(config, *sizes)
    if sizes is not None and with_layers:
        tensor, pipeline = sizes
        holding = set(stage_hosts(config, tensor, pipeline))
        for i in with_layers:
            if i not in holding:
                raise LayoutError(
                    f"hosts.{i}.layers: this host starts no pipeline stage (tensor={tensor}, "
                    f"pipeline={pipeline}); remove layers: from its entry"
                )


def check_microbatches(config, tensor: int, pipeline: int) -> None:
    """cluster.parallel.microbatches fits the layout (engine/microbatch.py); raises LayoutError."""
    parallel = config.cluster.parallel
    m = getattr(parallel, "microbatches", None)
    if m is None or m == 1:
        return
    key = "cluster.parallel.microbatches"
    if m != pipeline:
        raise LayoutError(f"{key}: {m} micro-batches for {pipeline} pipeline stage(s); use 1 or {pipeline}")
    if tensor > 1:
        raise LayoutError(
            f"{key}: micro-batches need tensor: 1 (hybrid stages reduce over the whole group); "
            "set microbatches: 1 or tensor: 1"
        )
    if config.speculative is not None:
        raise LayoutError(f"{key}: speculative decoding runs one forward pass at a time; set microbatches: 1")


def microbatch_count(config, layout) -> int:
    """Decode micro-batches for this layout: the explicit value, else P for a pure pipeline
    without speculative decoding, else 1 (plain forward passes, as before)."""
    check_microbatches(config, layout.tensor, layout.pipeline)
    m = getattr(config.cluster.parallel, "microbatches", None)
    if m is not None:
        return m
    plain = layout.tensor > 1 or config.speculative is not None
    return 1 if plain or not layout.is_pipelined else layout.pipeline


# ---------------------------------------------------------------------------
# Model facts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the layout and the report need from config.json and the safetensors headers."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layer_bytes: tuple[int, ...]  # weight bytes of each transformer layer
    other_bytes: int  # embedding, final norm, head: held by every rank
    later_stage_saving: int = 0  # an untied embedding's bytes: later pipeline stages do not hold it

    @classmethod
    def of(cls, model_config: dict, model_dir: Path | None) -> ModelFacts:
        from mlx_cluster.models.safetensors_reader import read_checkpoint

        text = model_config.get("text_config") or {}

        def get(key) -> int:
            value = model_config.get(key, text.get(key))
            return value if isinstance(value, int) and value > 0 else 0

        # Missing sizes (non-transformer configs) are 0: no check, no estimate.
        layers, hidden, heads = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or (hidden // heads if heads else 0)
        per_layer = [0] * layers
        other = embedding = 0
        untied = False
        if model_dir is not None:
            for name, info in read_checkpoint(Path(model_dir)).items():
                match = _LAYER_NAME.search(name)
                if match and int(match.group(1)) < layers:
                    per_layer[int(match.group(1))] += info.nbytes
                else:
                    other += info.nbytes
                    embedding += info.nbytes if "embed_tokens" in name else 0
                    untied = untied or "lm_head" in name
        saving = embedding if untied else 0
        return cls(layers, hidden, heads, kv_heads, head_dim, get("intermediate_size"), tuple(per_layer), other, saving)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes


def tensor_fits(facts: ModelFacts, tensor: int) -> bool:
    dims = [d for d in (facts.heads, facts.kv_heads, facts.intermediate) if d]
    return all(d % tensor == 0 for d in dims)


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


def _stage_counts(config, facts: ModelFacts, tensor: int, pipeline: int) -> tuple[list[int], str]:
    hosts = config.host_list()
    owners = stage_hosts(config, tensor, pipeline)
    per_host = {i: owners.count(i) for i in set(owners)}
    if hosts[0].layers is not None:
        total = sum(hosts[i].layers for i in per_host)
        if total != facts.num_layers:
            given = ", ".join(f"hosts.{i}.layers={hosts[i].layers}" for i in sorted(per_host))
            raise LayoutError(f"{given}: they add up to {total}, the model has {facts.num_layers} layers")
        counts: list[int] = []
        seen: dict[int, int] = {}
        for i in owners:
            base, extra = divmod(hosts[i].layers, per_host[i])
            if base == 0:
                raise LayoutError(f"hosts.{i}.layers: {hosts[i].layers} layers for {per_host[i]} stages on that host")
            counts.append(base + (1 if seen.get(i, 0) < extra else 0))
            seen[i] = seen.get(i, 0) + 1
        return counts, "layers from hosts[].layers"
    if hosts[0].memory_gb is not None:
        weights = [hosts[i].memory_gb / per_host[i] for i in owners]
        return split_layers(facts.num_layers, weights), "layers in proportion to hosts[].memory_gb"
    return split_layers(facts.num_layers, [1.0] * pipeline), "layers split evenly"


def _tensor_misfit(config, facts: ModelFacts, tensor: int, pipeline: int) -> str:
    world = tensor * pipeline
    dims = [(facts.kv_heads, "{} KV heads"), (facts.heads, "{} attention heads")]
    dims += [(facts.intermediate, "an MLP intermediate size of {}")]
    dims = [(v, w) for v, w in dims if v]
    common = math.gcd(*(v for v, _ in dims))
    value, what = next((v, w) for v, w in dims if v % tensor)
    divisors = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    fits = [t for t in range(1, world + 1) if world % t == 0 and tensor_fits(facts, t)]
    key = "cluster.parallel" if config.cluster.parallel is not None else "cluster.parallel (default: all tensor)"
    return (
        f"{key}: tensor={tensor}: model has {what.format(value)}, which {tensor} ranks cannot split evenly; "
        f"use a tensor size that divides {common} ({divisors}), the rest as pipeline stages: e.g. "
        f"cluster.parallel: {{tensor: {max(fits)}, pipeline: {world // max(fits)}}} (or parallel: auto)"
    )


def make_layout(config, facts: ModelFacts, tensor: int, pipeline: int, reason: str = "") -> Layout:
    if not tensor_fits(facts, tensor):
        raise LayoutError(_tensor_misfit(config, facts, tensor, pipeline))
    if pipeline > facts.num_layers:
        raise LayoutError(f"cluster.parallel.pipeline={pipeline}: the model has only {facts.num_layers} layers")
    counts, how = _stage_counts(config, facts, tensor, pipeline) if pipeline > 1 else ([facts.num_layers], "")
    why = "; ".join(x for x in (reason, how) if x)
    return Layout(tensor=tensor, pipeline=pipeline, stages=stage_ranges(counts), reason=why)


@dataclass(frozen=True)
class LinkCost:
    """Measured at start-up, averaged over the ranks (so every rank decides the same)."""

    alpha_s: float  # one small all_sum over the group
    bandwidth_Bps: float  # bytes per second of a large all_sum
    weight_rate_Bps: float  # weight bytes per second one rank's matmul streams


def step_cost_s(facts: ModelFacts, link: LinkCost, tensor: int, pipeline: int, batch: int = DECODE_BATCH) -> float:
    """The cost model of the module docstring."""
    compute = facts.weight_bytes / link.weight_rate_Bps / tensor
    reductions = (2 * facts.num_layers if tensor > 1 else 0) + (pipeline if pipeline > 1 else 0)
    message = batch * facts.hidden * 4
    return compute + reductions * (link.alpha_s + message / link.bandwidth_Bps)


def candidates(facts: ModelFacts, world_size: int) -> list[tuple[int, int]]:
    return [
        (t, world_size // t)
        for t in range(1, world_size + 1)
        if world_size % t == 0 and tensor_fits(facts, t) and world_size // t <= facts.num_layers
    ]


def choose_auto(config, facts: ModelFacts, world_size: int, link: LinkCost) -> Layout:
    options = candidates(facts, world_size)
    if not options:
        raise LayoutError(f"no tensor x pipeline split of {world_size} ranks fits this model")
    costs = {tp: step_cost_s(facts, link, *tp) for tp in options}
    best = min(options, key=lambda tp: (costs[tp], tp[1]))
    table = ", ".join(f"T{t}xP{p}: {costs[(t, p)] * 1e3:.2f} ms" for t, p in options)
    reason = (
        f"auto: link {link.alpha_s * 1e6:.0f} us per all_sum, {link.bandwidth_Bps / 1e9:.2f} GB/s, "
        f"weights at {link.weight_rate_Bps / 1e9:.2f} GB/s; modelled decode step {table}"
    )
    return make_layout(config, facts, *best, reason=reason)


def resolve_layout(config, facts: ModelFacts, world_size: int, link: LinkCost | None = None) -> Layout:
    """The layout `up` will use; `link` is needed (and only used) for parallel: auto."""
    sizes = parallel_sizes(config, world_size)
    if sizes is None:
        if link is None:
            raise LayoutError("parallel: auto needs link measurements (taken at start-up)")
        return choose_auto(config, facts, world_size, link)
    reason = "cluster.parallel" if config.cluster.parallel is not None else "default: all tensor parallel"
    return make_layout(config, facts, *sizes, reason=reason)


# ---------------------------------------------------------------------------
# The per-rank report (`mlx-cluster plan`, and logged by `up`)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlan:
    rank: int
    host: str
    stage: int
    layers: tuple[int, int]
    heads: int
    kv_heads: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_budget_bytes: int


def rank_plans(config, facts: ModelFacts, layout: Layout, kv_dtype_bytes: int = 2) -> list[RankPlan]:
    hosts = config.host_list()
    rank_hosts = _rank_hosts(config)
    plans = []
    for rank in range(layout.world_size):
        start, end = layout.layers_of(rank)
        kv_heads = facts.kv_heads // layout.tensor
        per_token = 2 * (end - start) * kv_heads * facts.head_dim * kv_dtype_bytes
        weights = facts.other_bytes + sum(facts.layer_bytes[start:end]) // layout.tensor
        if layout.is_pipelined and layout.stage_of(rank) > 0:
            weights -= facts.later_stage_saving
        plans.append(
            RankPlan(
                rank=rank,
                host=hosts[rank_hosts[rank]].host,
                stage=layout.stage_of(rank),
                layers=(start, end),
                heads=facts.heads // layout.tensor,
                kv_heads=kv_heads,
                weight_bytes=weights,
                kv_bytes_per_token=per_token,
                kv_budget_bytes=per_token * config.scheduler.max_kv_tokens,
            )
        )
    return plans


def check_memory(config, plans: list[RankPlan]) -> None:
    """Refuse a layout whose weights + KV budget exceed a host's memory_gb, with the numbers."""
    hosts = config.host_list()
    rank_hosts = _rank_hosts(config)
    used: dict[int, int] = {}
    for p in plans:
        used[rank_hosts[p.rank]] = used.get(rank_hosts[p.rank], 0) + p.weight_bytes + p.kv_budget_bytes
    for i, need in used.items():
        have = hosts[i].memory_gb
        if have is not None and need > have * 1e9:
            raise LayoutError(
                f"hosts.{i}.memory_gb={have:g}: its ranks need {need / 1e9:.2f} GB (weights + KV budget of "
                f"scheduler.max_kv_tokens={config.scheduler.max_kv_tokens}); no split fits: add ranks or memory, "
                "or lower scheduler.max_kv_tokens"
            )


def collectives_per_token(facts: ModelFacts, layout: Layout) -> str:
    """Expected collectives per forward pass (one decode step), as a sentence."""
    m = facts.hidden * 4
    parts = []
    if layout.tensor > 1:
        group = "the whole group (ring cannot split groups)" if layout.is_pipelined else f"{layout.tensor} ranks"
        parts.append(f"{2 * facts.num_layers} all_sums over {group} (2 per layer, {m} B per sequence each)")
    if layout.is_pipelined:
        parts.append(
            f"{layout.pipeline} all_sums over all {layout.world_size} ranks ({layout.pipeline - 1} stage hand-offs "
            f"+ 1 final hidden state to every rank, {m} B per sequence each)"
        )
    parts.append("1 control-bus message (the step plan)")
    return "; ".join(parts)


def format_plan(config, facts: ModelFacts, layout: Layout, plans: list[RankPlan]) -> str:
    lines = [
        f"layout: {layout.describe()}",
        f"why: {layout.reason}",
        f"collectives per decode step: {collectives_per_token(facts, layout)}",
        "rank  host             stage  layers   heads(q/kv)  weights     KV/token   KV budget",
    ]
    for p in plans:
        lines.append(
            f"{p.rank:>4}  {p.host[:16]:<16} {p.stage:>5}  {p.layers[0]:>2}-{p.layers[1] - 1:<3}  "
            f"{p.heads:>5}/{p.kv_heads:<5}  {_size(p.weight_bytes):>9}  {_size(p.kv_bytes_per_token):>9}  "
            f"{_size(p.kv_budget_bytes):>9}"
        )
    lines.append(f"(KV budget: scheduler.max_kv_tokens={config.scheduler.max_kv_tokens} tokens per rank)")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def auto_preview(facts: ModelFacts, world_size: int) -> str:
    """What `plan` says for parallel: auto (the choice needs measurements)."""
    options = ", ".join(f"T{t}xP{p}" for t, p in candidates(facts, world_size))
    return f"parallel: auto: chosen at start-up from measured link latency and bandwidth among {options}"


def plan_text(config, model_dir: Path, world_size: int) -> str:
    """The report `mlx-cluster plan` prints and `up` logs; raises LayoutError when nothing fits."""
    from mlx_lm.utils import load_config

    facts = ModelFacts.of(load_config(Path(model_dir)), model_dir)
    if parallel_sizes(config, world_size) is None:
        if not candidates(facts, world_size):
            raise LayoutError(f"parallel: auto: no tensor x pipeline split of {world_size} ranks fits this model")
        return auto_preview(facts, world_size)
    layout = resolve_layout(config, facts, world_size)
    plans = rank_plans(config, facts, layout)
    check_memory(config, plans)
    return format_plan(config, facts, layout, plans)
