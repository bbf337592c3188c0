"""Decode with micro-batches in flight across pipeline stages: every stage busy at every tick.

A pipelined forward pass runs the stages one after the other, so with P stages each rank
computes 1/P of the time. Here the decode batch is split into P micro-batches (``Lane``), each
with its own KV caches, and the batcher's step becomes a *tick*: stage s runs lane (t - s) mod
P, all the tick's hand-offs travel in one all_sum (``models/pipeline.py``: ``Tick``), and the
lane that leaves the last stage is sampled on every rank (identical tokens, as before). Lane
(t + 1) mod P completes at tick t and is the one stage 0 starts at tick t + 1, so each tick
finishes one micro-batch and starts the next.

``MicroBatches`` stands in for mlx-lm's one generation batch inside the batcher: the uids,
filter, extend and extract_cache it calls see the lanes (then the rows waiting to join one) as
one list. The engine, plans and bus are untouched: every rank makes the same calls in the same
order, so every rank holds the same lanes and knows every slot's size.

A lane's forward pass now spans P ticks, so its ``next()`` (mlx-lm's, which checks stops and
drops finished rows) runs when its tokens enter stage 0, and its sampling when it leaves the
last stage. New rows (just prefilled, their first token sampled by a plain forward pass) wait
and join lanes as those pass stage 0, up to an even share of the rows.

Prefill keeps the stages busy the same way: ``PipelinedPrefill`` cuts a prompt chunk into
pieces that follow each other through the stages, one all_sum per tick.
"""

from __future__ import annotations

import copy
import logging
import math

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_cluster.engine.decode import DecodeBatch
from mlx_cluster.models.pipeline import Tick, stage_edges

log = logging.getLogger(__name__)


class Lane(DecodeBatch):
    """One micro-batch: its rows, their caches and sampling state, and its forward in flight."""

    def __init__(self, *args, **kwargs):
        self.hidden: mx.array | None = None  # its rows' hidden state for the next stage to run
        self.fed: mx.array | None = None  # the tokens its forward in flight started from
        super().__init__(*args, **kwargs)

    @property
    def in_flight(self) -> bool:
        return self.fed is not None

    def _step(self):
        # Called by mlx-lm's next() as the lane enters stage 0: hand out the tokens sampled when
        # it last completed; the tick runs the forward pass and ``complete`` samples.
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        return self._hand_out(self._current_tokens)

    def complete(self, logits: mx.array) -> None:
        """The lane left the last stage: sample its rows' next tokens."""
        self._sample_next(logits, self.fed)
        self.fed = self.hidden = None

    def filter(self, keep):
        super().filter(keep)
        idx = mx.array(keep, dtype=mx.int32) if keep else None
        self.hidden = self.hidden[idx] if self.hidden is not None and keep else None
        self.fed = self.fed[idx] if self.fed is not None and keep else None

    def next(self):
        responses = super().next()
        if self.in_flight:
            # The fed token is in the caches of the stages it has passed only: a finished row's
            # cache is stored (prefix cache) up to the token before it on every rank alike.
            for r in responses:
                if r.all_tokens is not None:
                    r.all_tokens = r.all_tokens[:-1]
        return responses


def split_batch(batch: DecodeBatch, n: int) -> tuple[DecodeBatch, DecodeBatch]:
    """(the first n rows, the rest) of a generation batch, as two batches."""
    rest = copy.copy(batch)
    rest.prompt_cache = [copy.copy(c) for c in batch.prompt_cache]  # filter() changes caches in place
    batch.filter(list(range(n)))
    rest.filter(list(range(n, len(rest.uids))))
    return batch, rest


class MicroBatches:
    """P lanes in flight across P pipeline stages, in place of the batcher's generation batch."""

    speculator = None  # speculative decoding is not combined with micro-batches (config refuses it)

    def __init__(self, model, fallback_sampler, count: int):
        self.model = model
        self.edges = stage_edges(model)
        if self.edges is None or count != self.edges.pipeline:
            raise ValueError(f"{count} micro-batches need a model cut into {count} pipeline stages")
        self.edges.microbatches = count  # prefill chunks run as ticks too (PipelinedPrefill)
        self.lanes = [Lane.empty(model, fallback_sampler) for _ in range(count)]
        self.waiting: list[DecodeBatch] = []  # prefilled rows not in a lane yet
        self.tick = 0
        log.info("decode runs %d micro-batches in flight across the %d pipeline stages", count, count)

    # -- the generation batch, as mlx-lm's batcher reads it: lanes then waiting rows, in order --

    def _parts(self) -> list[DecodeBatch]:
        return [*self.lanes, *self.waiting]

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts())

    @property
    def uids(self) -> list[int]:
        return [u for p in self._parts() for u in p.uids]

    @property
    def tokens(self) -> list[list[int]]:
        # A row in flight has its latest token in some stages' caches only: see Lane.next.
        return [t[:-1] if getattr(p, "in_flight", False) else t for p in self._parts() for t in p.tokens]

    @property
    def prompt_cache(self) -> list:
        return [c for p in self._parts() for c in p.prompt_cache]

    def _locate(self, i: int) -> tuple[DecodeBatch, int]:
        for p in self._parts():
            if i < len(p):
                return p, i
            i -= len(p)
        raise IndexError(i)

    def extract_cache(self, i: int) -> list:
        part, row = self._locate(i)
        return part.extract_cache(row)

    def filter(self, keep: list[int]) -> None:
        keep, base = set(keep), 0
        for part in self._parts():
            n = len(part)
            mine = [i - base for i in range(base, base + n) if i in keep]
            if len(mine) < n:
                part.filter(mine)
            base += n
        self.waiting = [w for w in self.waiting if len(w)]

    def extend(self, batch: DecodeBatch) -> None:
        if len(batch):
            self.waiting.append(batch)

    # -- one tick --

    def _admit(self, lane: Lane) -> None:
        """Move waiting rows into the lane about to enter stage 0, up to an even share."""
        share = math.ceil(len(self) / len(self.lanes))
        while self.waiting and len(lane) < share:
            batch = self.waiting.pop(0)
            if len(lane) + len(batch) > share:
                batch, rest = split_batch(batch, share - len(lane))
                self.waiting.insert(0, rest)
            lane.extend(batch)

    def next(self) -> list:
        """One tick: each stage runs its lane, one all_sum, the completing lane is sampled; returns
        the tokens of the lane entering stage 0 (sampled when it last completed)."""
        P, t, stage = len(self.lanes), self.tick, self.edges.stage
        self.tick += 1
        slots = [self.lanes[(t - j) % P] for j in range(P)]  # slot j: the lane stage j runs
        starting, completing, mine = slots[0], slots[P - 1], slots[stage]
        self._admit(starting)
        starting.fed = starting._next_tokens if len(starting) else None

        tick = Tick(shapes=[(len(lane), 1) for lane in slots], hidden_in=mine.hidden)
        self.edges.tick = tick
        try:
            if len(mine):
                logits = self.model(mine.fed[:, None], cache=mine.prompt_cache)
            else:  # a stand-in row: the model call gives the completing lane's logits all the same
                logits = self.model(mx.zeros((1, 1), dtype=mx.uint32), cache=make_prompt_cache(self.model))
        finally:
            self.edges.tick = None
        for j, lane in enumerate(slots[:-1]):
            lane.hidden = tick.slot(j)
        mx.async_eval(tick.result)  # every rank's all_sum, whether or not a lane completes
        if len(completing):
            completing.complete(logits[:, -1, :])
        return starting.next()  # mlx-lm's: hands out the tokens, checks stops, drops finished rows


# Prefill pieces per stage and chunk: the fill and drain bubble is (P - 1) of the 4P + P - 1 ticks.
PIECES_PER_STAGE = 4
MIN_PIECE_TOKENS = 16  # shorter pieces make matmuls too small to be worth a tick


class PipelinedPrefill:
    """Stands in for the model in mlx-lm's prefill loop: a prompt chunk goes through the stages
    as pieces in flight. Stage s runs piece k - s at tick k on its own layers' caches (a stage's
    caches see the pieces in order, so attention is exactly the chunk's), and the pieces' hand-offs
    travel one all_sum per tick (``Tick``). A chunk of n pieces takes n + P - 1 ticks of 1/n of a
    stage's work, instead of P stages' work one after the other."""

    def __init__(self, model, edges):
        self.model, self.edges = model, edges

    def __call__(self, tokens: mx.array, cache) -> None:
        P, stage = self.edges.pipeline, self.edges.stage
        rows, length = tokens.shape
        size = max(MIN_PIECE_TOKENS, math.ceil(length / (PIECES_PER_STAGE * P)))
        pieces = [tokens[:, i : i + size] for i in range(0, length, size)]

        def shape(j: int, k: int) -> tuple[int, int]:  # stage j's output at tick k (the last stage's: unused)
            return (rows, pieces[k - j].shape[1]) if j < P - 1 and 0 <= k - j < len(pieces) else (0, 0)

        hidden = None  # this stage's next piece, as the previous stage sent it
        for k in range(len(pieces) + P - 1):
            tick = Tick(shapes=[shape(j, k) for j in range(P)], hidden_in=hidden)
            self.edges.tick = tick
            try:
                if 0 <= k - stage < len(pieces):
                    self.model(pieces[k - stage], cache=cache)
                else:  # not this stage's turn: a stand-in row (uncomputed) keeps the tick's collective
                    self.model(mx.zeros((1, 1), dtype=mx.uint32), cache=make_prompt_cache(self.model))
            finally:
                self.edges.tick = None
            hidden = tick.slot(stage - 1) if stage > 0 else None
            mx.eval([c.state for c in cache], *([tick.result] if tick.result is not None else []))


def pipelined_prefill(model) -> PipelinedPrefill | None:
    """The prefill stand-in when decode runs micro-batches (MicroBatches marks the edges), else None."""
    edges = stage_edges(model)
    return PipelinedPrefill(model, edges) if edges is not None and edges.microbatches > 1 else None
