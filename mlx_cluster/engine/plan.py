"""What rank 0 tells every rank to do in one engine step.

A `StepPlan` carries only changes: sequences that join the batch (sent once, with their
token ids and sampling parameters) and sequences that leave it. A steady decode step is an
empty plan. The binary codec is explicit and bounded: nothing read off the network is
trusted, pickled or evaluated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PLAN_VERSION = 6  # 4: LoRA adapter slots and operations; 5: prefetch hints for the SSD tier; 6: models

# Bounds a decoder enforces before allocating anything.
MAX_NEW_SEQS = 1024
MAX_DROPS = 4096
MAX_PROMPT_TOKENS = 1 << 20
MAX_STOP_IDS = 64
MAX_LOGIT_BIAS = 1024
MAX_RESTORE_BLOCKS = 1 << 16
# A compiled llguidance grammar (JSON schemas, tool signatures). Small enough that a plan with
# the most new sequences a step admits (256) stays far below the bus's 64 MiB frame limit.
MAX_GRAMMAR_BYTES = 128 << 10
MAX_ADAPTER_OPS = 64
MAX_ADAPTER_PATH_BYTES = 4096
MAX_MODEL_OPS = 64
MODEL_LOAD, MODEL_UNLOAD = 1, 2

FLAG_IDLE = 1  # the batch is empty: the next plan is announced by the doorbell first
FLAG_SHUTDOWN = 2  # every rank leaves its loop after this step
FLAG_CLEAR_CACHE = 4  # every rank empties its prefix cache (RAM and SSD) before this step's work
KNOWN_FLAGS = FLAG_IDLE | FLAG_SHUTDOWN | FLAG_CLEAR_CACHE


class PlanDecodeError(ValueError):
    """A plan frame that does not match the schema: the sender or the wire is broken."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling, identical on every rank so every rank samples the same token."""

    max_tokens: int
    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class NewSequence:
    """A sequence joining the batch: its full prompt and how much of it comes from the prefix cache."""

    seq_id: int
    prompt: tuple[int, ...]
    params: SamplingParams
    # Prefix-cache blocks to restore before prefill (block hashes, in order), and blocks of
    # this prompt to store once it is prefilled. Decided on rank 0 so every rank agrees.
    restore_blocks: tuple[bytes, ...] = ()
    store_blocks: tuple[bytes, ...] = ()
    # The llguidance grammar that constrains this sequence's output ("" = free). Compiled once on
    # rank 0; every rank builds its own matcher from the same string, so masks agree everywhere.
    grammar: str = ""
    # The LoRA adapter slot the sequence runs with (models/lora.py; 0 = none).
    adapter: int = 0


@dataclass(frozen=True)
class AdapterOp:
    """Load the adapter at `path` into `slot` on every rank, or (path "") empty the slot."""

    slot: int
    path: str = ""


@dataclass(frozen=True)
class ModelOp:
    """Load or unload configured model number `model` (engine/models.py) on every rank."""

    kind: int  # MODEL_LOAD | MODEL_UNLOAD
    model: int


@dataclass(frozen=True)
class StepPlan:
    step: int
    new: tuple[NewSequence, ...] = ()
    drop: tuple[int, ...] = ()
    flags: int = 0
    digest: int = 0  # rank 0's running digest of every token sampled before this step
    adapters: tuple[AdapterOp, ...] = ()  # run after the drops and before the new sequences
    # Prefix-cache blocks a queued request will want: each rank starts reading those on its SSD
    # tier in the background, so they are in memory by the time the request is admitted.
    prefetch: tuple[bytes, ...] = ()
    # Several models (engine/models.py): the configured model whose batch this step runs, and
    # the loads and unloads every rank does first. Always 0 and () with a single model:.
    model: int = 0
    model_ops: tuple[ModelOp, ...] = ()

    @property
    def idle(self) -> bool:
        return bool(self.flags & FLAG_IDLE)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & FLAG_SHUTDOWN)

    @property
    def clear_cache(self) -> bool:
        return bool(self.flags & FLAG_CLEAR_CACHE)


@dataclass
class _Writer:
    parts: list[bytes] = field(default_factory=list)

    def pack(self, fmt: str, *values) -> None:
        self.parts.append(struct.pack("<" + fmt, *values))

    def ints(self, values, count_fmt: str = "I") -> None:
        self.pack(count_fmt, len(values))
        self.parts.append(struct.pack(f"<{len(values)}I", *values))

    def blobs(self, values: tuple[bytes, ...]) -> None:
        self.pack("I", len(values))
        for v in values:
            self.pack("B", len(v))
            self.parts.append(v)

    def text(self, value: str) -> None:
        data = value.encode("utf-8")
        self.pack("I", len(data))
        self.parts.append(data)


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def unpack(self, fmt: str):
        fmt = "<" + fmt
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise PlanDecodeError("plan frame is truncated")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def count(self, fmt: str, limit: int, what: str) -> int:
        (n,) = self.unpack(fmt)
        if n > limit:
            raise PlanDecodeError(f"plan frame has {n} {what}, more than the limit {limit}")
        return n

    def ints(self, limit: int, what: str, count_fmt: str = "I") -> tuple[int, ...]:
        n = self.count(count_fmt, limit, what)
        return self.unpack(f"{n}I") if n else ()

    def blobs(self, limit: int, what: str) -> tuple[bytes, ...]:
        n = self.count("I", limit, what)
        out = []
        for _ in range(n):
            (size,) = self.unpack("B")
            out.append(bytes(self.unpack(f"{size}s")[0]))
        return tuple(out)

    def text(self, limit: int, what: str) -> str:
        n = self.count("I", limit, what)
        try:
            return bytes(self.unpack(f"{n}s")[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise PlanDecodeError(f"plan frame has {what} that are not UTF-8") from None


_PARAMS_FMT = "IQfffffffBB"


def _write_params(w: _Writer, p: SamplingParams) -> None:
    w.pack(
        _PARAMS_FMT,
        p.max_tokens,
        p.seed,
        p.temperature,
        p.top_p,
        float(p.top_k),
        p.min_p,
        p.presence_penalty,
        p.frequency_penalty,
        p.repetition_penalty,
        int(p.logprobs),
        p.top_logprobs,
    )
    w.ints(p.stop_token_ids, "H")
    w.pack("H", len(p.logit_bias))
    for token, bias in p.logit_bias:
        w.pack("If", token, bias)


def _read_params(r: _Reader) -> SamplingParams:
    (max_tokens, seed, temperature, top_p, top_k, min_p, presence, frequency, repetition, logprobs, top_lp) = r.unpack(
        _PARAMS_FMT
    )
    stop = r.ints(MAX_STOP_IDS, "stop token ids", "H")
    n_bias = r.count("H", MAX_LOGIT_BIAS, "logit biases")
    bias = tuple(r.unpack("If") for _ in range(n_bias))
    return SamplingParams(
        max_tokens=max_tokens,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        top_k=int(top_k),
        min_p=min_p,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        stop_token_ids=stop,
        logit_bias=bias,
        logprobs=bool(logprobs),
        top_logprobs=top_lp,
    )


def encode_plan(plan: StepPlan) -> bytes:
    """Serialize a plan; the inverse of `decode_plan`."""
    w = _Writer()
    w.pack("HHQI", PLAN_VERSION, plan.flags, plan.step, plan.digest)
    w.pack("I", len(plan.new))
    for seq in plan.new:
        w.pack("Q", seq.seq_id)
        w.ints(seq.prompt)
        _write_params(w, seq.params)
        w.blobs(seq.restore_blocks)
        w.blobs(seq.store_blocks)
        w.text(seq.grammar)
        w.pack("H", seq.adapter)
    w.pack("I", len(plan.drop))
    w.parts.append(struct.pack(f"<{len(plan.drop)}Q", *plan.drop))
    w.pack("I", len(plan.adapters))
    for op in plan.adapters:
        w.pack("H", op.slot)
        w.text(op.path)
    w.blobs(plan.prefetch)
    w.pack("HI", plan.model, len(plan.model_ops))
    for op in plan.model_ops:
        w.pack("BH", op.kind, op.model)
    return b"".join(w.parts)


def decode_plan(data: bytes) -> StepPlan:
    """Parse a plan frame, rejecting anything outside the schema's bounds."""
    r = _Reader(data)
    version, flags, step, digest = r.unpack("HHQI")
    if version != PLAN_VERSION:
        raise PlanDecodeError(f"plan version {version} is not {PLAN_VERSION}: every rank must run the same mlx-cluster")
    if flags & ~KNOWN_FLAGS:
        raise PlanDecodeError(f"plan flags {flags:#x} include unknown bits")
    new = []
    for _ in range(r.count("I", MAX_NEW_SEQS, "new sequences")):
        (seq_id,) = r.unpack("Q")
        prompt = r.ints(MAX_PROMPT_TOKENS, "prompt tokens")
        params = _read_params(r)
        restore = r.blobs(MAX_RESTORE_BLOCKS, "blocks to restore")
        store = r.blobs(MAX_RESTORE_BLOCKS, "blocks to store")
        grammar = r.text(MAX_GRAMMAR_BYTES, "grammar bytes")
        (adapter,) = r.unpack("H")
        new.append(NewSequence(seq_id, prompt, params, restore, store, grammar, adapter))
    n_drop = r.count("I", MAX_DROPS, "dropped sequences")
    drop = r.unpack(f"{n_drop}Q") if n_drop else ()
    adapters = []
    for _ in range(r.count("I", MAX_ADAPTER_OPS, "adapter operations")):
        (slot,) = r.unpack("H")
        adapters.append(AdapterOp(slot, r.text(MAX_ADAPTER_PATH_BYTES, "adapter path bytes")))
    prefetch = r.blobs(MAX_RESTORE_BLOCKS, "blocks to prefetch")
    (model,) = r.unpack("H")
    model_ops = []
    for _ in range(r.count("I", MAX_MODEL_OPS, "model operations")):
        kind, index = r.unpack("BH")
        if kind not in (MODEL_LOAD, MODEL_UNLOAD):
            raise PlanDecodeError(f"plan frame has model operation kind {kind}, not load or unload")
        model_ops.append(ModelOp(kind, index))
    if r.pos != len(r.data):
        raise PlanDecodeError(f"plan frame has {len(r.data) - r.pos} trailing bytes")
    return StepPlan(
        step=step,
        new=tuple(new),
        drop=tuple(drop),
        flags=flags,
        digest=digest,
        adapters=tuple(adapters),
        prefetch=prefetch,
        model=model,
        model_ops=tuple(model_ops),
    )
