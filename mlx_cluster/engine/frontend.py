"""Rank 0's side of the engine: requests in, scheduling decisions out, tokens back.

The HTTP thread only calls `submit()` and `abort()`, which put messages in an inbox. Everything
else runs on the engine thread, so request state needs no locks. Results go back through each
request's `deliver` callback, which must be thread-safe (the server hands in one that hops
onto its asyncio loop).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mlx_cluster.cache.restore_planner import RestorePlanner
from mlx_cluster.engine.executor import TokenOutput
from mlx_cluster.engine.output import TextAssembler
from mlx_cluster.engine.plan import FLAG_CLEAR_CACHE, NewSequence, SamplingParams, StepPlan
from mlx_cluster.engine.scheduler import SchedulerInput, schedule

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[object], None]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    grammar: str = ""  # llguidance grammar constraining the output (constrain/grammar.py); "" = free
    adapter: int = 0  # the LoRA adapter slot to run with (engine/adapters.py; 0 = none)


@dataclass
class TokenEvent:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]]
    finish_reason: str | None
    ts: float
    stop_sequence: str | None = None  # the stop string that ended the sequence (Anthropic reports it)


@dataclass
class DoneEvent:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queued_s: float


@dataclass
class ErrorEvent:
    message: str
    status: int = 500
    code: str | None = None


@dataclass
class _Request:
    req: GenerationRequest
    open_seqs: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    admitted_at: float | None = None


@dataclass
class _Seq:
    request: _Request
    index: int
    assembler: TextAssembler
    tokens: int = 0
    finished: bool = False


@dataclass
class FrontendStats:
    """Plain counters; server/metrics.py maps them to Prometheus."""

    requests_waiting: int = 0
    requests_running: int = 0
    seqs_running: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    aborted_total: int = 0
    last_step_at: float = 0.0
    steps_total: int = 0


class Frontend:
    def __init__(
        self,
        tokenizer,
        *,
        max_batch_size: int,
        max_new_per_step: int,
        max_queue: int,
        prefix_cache=None,
        max_kv_tokens: int | None = None,
        wake: threading.Event | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_new_per_step = max_new_per_step
        self.max_queue = max_queue
        self.prefix_cache = prefix_cache
        # Prefetches a queued request's SSD blocks and holds it while that pays (cache/cost.py).
        self.hidden_ids = set(getattr(tokenizer, "all_special_ids", []) or []) | set(tokenizer.eos_token_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Several models (engine/models.py) share one event: the engine sleeps until any has work.
        self._wake = wake or threading.Event()
        self._queued = 0  # requests submitted but not yet admitted; read by the HTTP thread
        self._open = 0  # requests submitted and not yet finished or aborted
        self._queued_lock = threading.Lock()
        self._waiting: deque[NewSequence] = deque()
        self._seqs: dict[int, _Seq] = {}
        self._requests: dict[str, _Request] = {}
        self._running: set[int] = set()
        self._drop: set[int] = set()
        self._seq_ids = itertools.count(1)
        self._clear_requested: list[Callable[[], None]] = []  # callbacks waiting for a cache clear plan
        self._clear_published: list[Callable[[], None]] = []  # ... whose plan runs this step
        # Live KV budget in tokens: each admitted sequence reserves prompt + max_tokens, so a
        # running sequence can never run out of KV room mid-generation (no preemption needed).
        self.max_kv_tokens = max_kv_tokens
        self._kv_reserved = 0  # written by the engine thread, read by the HTTP thread
        self._kv_need: dict[int, int] = {}
        self._running_adapters: dict[int, int] = {}  # running seq id -> its adapter slot, when not 0
        self.adapter_scheduler = None  # engine/adapters.py AdapterScheduler, when adapters are served
        self.shutdown_requested = False
        self.stats = FrontendStats()
        self.attach_cache(prefix_cache, max_kv_tokens)

    def attach_cache(self, prefix_cache, max_kv_tokens: int | None) -> None:
        """The model's prefix cache and KV budget (engine/models.py: set again at each load)."""
        self.prefix_cache = prefix_cache
        self.max_kv_tokens = max_kv_tokens
        self.restores = (
            RestorePlanner(prefix_cache, world_size=prefix_cache.world_size) if prefix_cache is not None else None
        )
        if prefix_cache is not None and prefix_cache.ssd is not None:
            prefix_cache.ssd.on_staged = self.wake_up
        if self.restores is not None:
            for seq in self._waiting:  # requests that queued while the model was not loaded
                self.restores.arrived(seq)

    def detach_cache(self) -> None:
        """The model was unloaded: its prefix cache is closed (engine/models.py)."""
        self.prefix_cache = self.restores = None

    # ---- HTTP thread ---------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> bool:
        """Queue a request; False when the queue is full (the caller answers 429)."""
        with self._queued_lock:
            if self._queued >= self.max_queue:
                return False
            self._queued += 1
            self._open += 1
        self._inbox.put(("submit", req))
        self._wake.set()
        return True

    def kv_admission_error(self, prompt_len: int, max_tokens: int, n: int) -> str | None:
        """Why a request cannot be queued for KV reasons: "too_large" (never fits: 400) or
        "kv_full" (no room now and others already wait for room: 503, retry later)."""
        if self.max_kv_tokens is None:
            return None
        need = (prompt_len + max_tokens) * n
        if need > self.max_kv_tokens:
            return "too_large"
        if self._kv_reserved + need > self.max_kv_tokens and self._queued > 0:
            return "kv_full"
        return None

    def kv_usage(self) -> float:
        """Fraction of the live KV budget reserved by running sequences (0-1)."""
        return self._kv_reserved / self.max_kv_tokens if self.max_kv_tokens else 0.0

    def _reserve(self, seq: NewSequence) -> None:
        need = len(seq.prompt) + seq.params.max_tokens
        self._kv_need[seq.seq_id] = need
        self._kv_reserved += need
        if seq.adapter:
            self._running_adapters[seq.seq_id] = seq.adapter

    def _release(self, seq_id: int) -> None:
        self._kv_reserved -= self._kv_need.pop(seq_id, 0)
        self._running_adapters.pop(seq_id, None)

    def adapter_request(self, request) -> None:
        """Load or unload a LoRA adapter (an engine/adapters.py AdapterRequest) on every rank."""
        self._inbox.put(("adapter", request))
        self._wake.set()

    def adapters_applied(self, results: dict[int, str | None]) -> None:
        """Every rank ran this step's adapter operations; `results` are rank 0's (slot -> error)."""
        if self.adapter_scheduler is not None:
            self.adapter_scheduler.applied(results)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def abort_all(self, message: str) -> None:
        """End every request with `message` (used when a drain runs out of time)."""
        self._inbox.put(("abort_all", message))
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return self._queued

    def has_work_threadsafe(self) -> bool:
        return self._open > 0

    def clear_cache(self, done: Callable[[], None]) -> None:
        """Empty the prefix cache on every rank at the next step; `done` runs (engine thread) once it has."""
        self._inbox.put(("clear_cache", done))
        self._wake.set()

    def wake_up(self) -> None:
        """Any thread: SSD reads finished (here or on a worker), so a held request may go now."""
        self._wake.set()

    def request_shutdown(self) -> None:
        self.shutdown_requested = True
        self._wake.set()

    # ---- engine thread -------------------------------------------------------------
    def wait_for_work(self, timeout_s: float) -> None:
        """Sleep while idle; wakes on a new request, an abort or shutdown."""
        if self._inbox.empty() and not self.shutdown_requested:
            if self.restores is not None and self.restores.waiting_for_reads:
                timeout_s = min(timeout_s, 0.02)  # a held request's wait may run out before its reads end
            self._wake.wait(timeout_s)
        self._wake.clear()

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._requests)

    def drain_inbox(self) -> None:
        """Take in what the HTTP thread sent (engine/models.py looks at every model's queue)."""
        self._drain_inbox()

    def next_plan(self, step: int, digest: int) -> StepPlan:
        self._drain_inbox()
        waiting = list(self._waiting)
        if self.restores is not None:
            waiting = self._not_held(waiting)
        decision = schedule(
            SchedulerInput(
                step=step,
                waiting=waiting,
                running=frozenset(self._running),
                drop=frozenset(self._drop),
                max_batch_size=self.max_batch_size,
                max_new_per_step=self.max_new_per_step,
                digest=digest,
                shutdown=self.shutdown_requested and not self._running and not self._waiting,
                kv_tokens_free=None if self.max_kv_tokens is None else self.max_kv_tokens - self._kv_reserved,
            )
        )
        now = time.monotonic()
        admitted = waiting[: decision.admitted]
        if len(admitted) < len(self._waiting):
            taken = {s.seq_id for s in admitted}
            self._waiting = deque(s for s in self._waiting if s.seq_id not in taken)
        else:
            self._waiting.clear()
        for seq in admitted:
            self._running.add(seq.seq_id)
            self._reserve(seq)
            state = self._seqs[seq.seq_id]
            if state.request.admitted_at is None:
                state.request.admitted_at = now
                with self._queued_lock:
                    self._queued -= 1
        self._running.difference_update(decision.plan.drop)
        for seq_id in decision.plan.drop:
            self._release(seq_id)
        self._drop.clear()
        self._update_stats()
        plan = decision.plan
        if self.restores is not None:
            # Decided at admission, not arrival, so blocks stored or read while the request queued count.
            new = tuple(self.restores.admitted(s) for s in plan.new)
            plan = dataclasses.replace(plan, new=new, prefetch=self.restores.take_hints(step))
        if self.adapter_scheduler is not None:
            in_use = {s.adapter for s in self._waiting} | set(self._running_adapters.values())
            ops = self.adapter_scheduler.next_ops(in_use)
            if ops:
                plan = dataclasses.replace(plan, adapters=ops)
        if self._clear_requested:
            plan = dataclasses.replace(plan, flags=plan.flags | FLAG_CLEAR_CACHE)
            self._clear_published, self._clear_requested = self._clear_requested, []
        return plan

    def _not_held(self, waiting: list[NewSequence]) -> list[NewSequence]:
        """The first waiting sequences not held back for their SSD reads, as many as one step admits."""
        out = []
        for seq in waiting:
            if len(out) >= self.max_new_per_step:
                break
            if not self.restores.held(seq):
                out.append(seq)
        return out

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._add(item)
            elif kind == "abort":
                self._abort(item)
            elif kind == "clear_cache":
                self._clear_requested.append(item)
            elif kind == "adapter":
                if self.adapter_scheduler is None:
                    item.done("this server does not serve LoRA adapters")
                else:
                    self.adapter_scheduler.add(item)
            else:
                for request in list(self._requests.values()):
                    request.req.deliver(ErrorEvent(item, 503, "shutting_down"))
                    self._abort(request.req.request_id)

    def _add(self, req: GenerationRequest) -> None:
        if not req.prompt:
            # The batcher cannot take an empty prompt; failing here keeps one bad request
            # from taking down the engine on every rank.
            with self._queued_lock:
                self._queued -= 1
                self._open -= 1
            req.deliver(ErrorEvent("the prompt is empty", 400, "invalid_value"))
            return
        request = _Request(req, open_seqs=req.n)
        self._requests[req.request_id] = request
        for index in range(req.n):
            seq_id = next(self._seq_ids)
            params = req.params
            if index:
                # n > 1: independent samples of the same prompt, still reproducible from the seed.
                params = SamplingParams(**{**params.__dict__, "seed": (params.seed + index) & 0xFFFFFFFFFFFFFFFF})
            seq = NewSequence(
                seq_id=seq_id, prompt=tuple(req.prompt), params=params, grammar=req.grammar, adapter=req.adapter
            )
            assembler = TextAssembler(self.tokenizer.detokenizer, req.stop, self.hidden_ids)
            self._seqs[seq_id] = _Seq(request, index, assembler)
            self._waiting.append(seq)
            if self.restores is not None:
                self.restores.arrived(seq)

    def _abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self.stats.aborted_total += 1
        with self._queued_lock:
            self._open -= 1
            if request.admitted_at is None:
                self._queued -= 1
        for seq_id, seq in list(self._seqs.items()):
            if seq.request is request:
                del self._seqs[seq_id]
                if self.restores is not None:
                    self.restores.forget(seq_id)
                if seq_id in self._running:
                    self._drop.add(seq_id)
        self._waiting = deque(s for s in self._waiting if s.seq_id in self._seqs)

    def emit(self, outputs: list[TokenOutput]) -> None:
        """Deliver this step's tokens; sequences that hit a stop string are dropped next step."""
        now = time.monotonic()
        self.stats.last_step_at = now
        self.stats.steps_total += 1
        for done in self._clear_published:
            done()
        self._clear_published = []
        for out in outputs:
            seq = self._seqs.get(out.seq_id)
            if out.finish_reason is not None:
                self._running.discard(out.seq_id)
                self._release(out.seq_id)
            if seq is None or seq.finished:
                continue  # aborted, or the extra token computed after a stop string
            seq.tokens += 1
            seq.request.completion_tokens += 1
            seq.request.cached_tokens += out.cached_tokens  # what the executor actually restored
            self.stats.generation_tokens_total += 1
            try:
                text, stopped = seq.assembler.add(out.token)
                finish = out.finish_reason
                if stopped and finish is None:
                    self._drop.add(out.seq_id)
                if finish is not None and not stopped:
                    text += seq.assembler.finish()
                    stopped = seq.assembler.stopped  # the flushed tail may complete a stop string
            except Exception as e:  # this request's output is broken; the batch and the server go on
                log.exception("request %s failed while assembling its text", seq.request.req.request_id)
                seq.request.req.deliver(
                    ErrorEvent(f"generation failed: {type(e).__name__}: {e}", 500, "internal_error")
                )
                self._abort(seq.request.req.request_id)
                continue
            if stopped:
                finish = "stop"  # a stop string wins over a length limit reached on the same token
            if finish is not None:
                seq.finished = True
            logprobs = [(out.token, out.logprob, out.top_logprobs)] if out.logprob is not None else []
            matched = seq.assembler.matched if stopped else None
            seq.request.req.deliver(TokenEvent(seq.index, text, [out.token], logprobs, finish, now, matched))
            if finish is not None:
                self._finish_seq(out.seq_id, seq)
        self._update_stats()

    def _finish_seq(self, seq_id: int, seq: _Seq) -> None:
        del self._seqs[seq_id]
        request = seq.request
        request.open_seqs -= 1
        if request.open_seqs == 0:
            self._requests.pop(request.req.request_id, None)
            with self._queued_lock:
                self._open -= 1
            req = request.req
            self.stats.prompt_tokens_total += len(req.prompt) * req.n
            queued = (request.admitted_at or req.arrival) - req.arrival
            # OpenAI counts the prompt once however many choices (n) share it; cached tokens likewise.
            cached = request.cached_tokens // req.n
            req.deliver(DoneEvent(len(req.prompt), request.completion_tokens, cached, queued))

    def fail_all(self, message: str, status: int = 503, code: str = "engine_unavailable") -> None:
        """The engine cannot go on: end every request with an error instead of leaving it hanging."""
        self._drain_inbox()
        for request in list(self._requests.values()):
            request.req.deliver(ErrorEvent(message, status, code))
        self._requests.clear()
        with self._queued_lock:
            self._queued = self._open = 0
        self._seqs.clear()
        self._waiting.clear()
        self._running.clear()
        self._kv_need.clear()
        self._kv_reserved = 0
        if self.adapter_scheduler is not None:
            self.adapter_scheduler.fail_all(message)

    def _update_stats(self) -> None:
        s = self.stats
        s.requests_running = sum(1 for r in self._requests.values() if r.admitted_at is not None)
        s.requests_waiting = len(self._requests) - s.requests_running
        s.seqs_running = len(self._running)
