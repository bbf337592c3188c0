"""Speculative decoding inside the continuous batch, identical on every rank.

One speculative step replaces one plain decode step of the batch (`DecodeBatch.next`):

1. Each speculating row gets up to K proposed tokens, computed on every rank from the same
   tokens: prompt lookup (`NgramProposer`: the latest earlier occurrence of the context's last
   n tokens, and what followed it) or a small draft model loaded whole on every rank
   (`DraftProposer`, greedy). No proposal crosses the control bus.
2. The target model verifies every row's proposals in one forward of width W = 1 + max k:
   row i feeds [its last sampled token y, d_0 .. d_{k-1}, padding].
3. Every position j is sampled exactly as the plain step would sample the row's token number
   n + j (same compiled sampler, same counter-based Gumbel noise of the row's seed). Proposal
   d_j is accepted while it equals that sample. The row emits y and the accepted proposals;
   the first sample that differed (or the one after the last accepted proposal) is its next
   input, as in a plain step.

Why that is distribution-preserving: both proposers give a point mass (a deterministic token).
The exact rejection rule for a point-mass proposal d is "accept with probability p(d), else
draw from p without d, renormalized"; a Gumbel-max sample t ~ p equals d with probability p(d),
and given t != d it is distributed as p without d. So "accept iff t == d, else emit t" is that
rule, and it draws the very numbers the plain step would: greedy output is the plain output,
and seeded sampled output is the plain seeded output too (up to the rounding differences of a
width-W forward against a width-1 one).

KV rollback: the cache holds W new entries per row; row i keeps 1 + a_i. All rows are trimmed
to the longest kept length m (`BatchKVCache.trim`), and a row that kept fewer is rolled right
by the difference, which turns its rejected tail into left padding (mlx-lm's own
`prepare(right_padding=...)` + `finalize()`, which prefill uses for the same job). A single
row (the common single-stream case) never rolls.

Rows that use logits processors (penalties, logit_bias) or a grammar never speculate: inside a
speculative step they take only position 0, processed exactly as in a plain step. Speculation
pauses when the batch has more than `max_batch_size` rows, when a layer's cache is not a plain
`BatchKVCache` (sliding windows, SSM state), and when no row has a proposal (then the
pipelined plain step runs).

Looking is cheap, waiting is not. The step's inputs (each row's pending token) are still on
the device when the step begins; reading them drains the one-step-ahead pipeline of plain
steps. So a row is first asked whether its known tokens promise a proposal
(`Proposer.hopeful`: for n-gram lookup, whether the known suffix recurs, kept in an
incremental index); only then does the step wait for the pending tokens and look up for real.
A row that promises nothing just looks again next step, and loops are caught as they start.

Whether a verify pays, per row: a verify step costs more than a plain one (it is synchronous,
wider, and a draft model proposes first), and that price differs by an order of magnitude
between machines: about 1.6 plain steps on an H200 at any width, 1.8 to 3.8 on a CPU whose
BLAS is compute-bound at batch 1. So it is measured (engine/verify_cost.py, at start-up, the
largest figure of any rank agreed on the bus), not assumed. Each row keeps a running estimate
p of the chance that its next proposal is accepted (accepted proposals against rejections,
halved weight per verify), expects 1 + p + .. + p^k tokens from k proposals, and proposes the
k that gives the most tokens per unit of cost, if that beats a plain step's one token per step.
A row that does not pay, or whose real lookup found nothing after the wait, sits out 1, 2,
4 .. MAX_BACKOFF_STEPS steps and then probes with one proposal, so on free-form text the batch
runs plain, pipelined steps and pays little for looking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from mlx_cluster.engine.verify_cost import VerifyCost
from mlx_cluster.models.lora import select_rows

log = logging.getLogger(__name__)

MAX_BACKOFF_STEPS = 32


@dataclass
class SpecStats:
    """Counters in vLLM's spec-decode terms (read by server/metrics.py on rank 0)."""

    num_drafts: int = 0  # row-verifications that had at least one proposal
    num_draft_tokens: int = 0  # proposed tokens verified
    num_accepted_tokens: int = 0  # proposed tokens accepted
    spec_steps: int = 0  # batch steps that verified proposals

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification of a row: 1 (the target's own) + accepted proposals."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class _RowState:
    k: int  # proposals to ask for next time
    wait: int = 0  # steps to sit out before looking again
    backoff: int = 1  # the next wait after a miss
    # Accepted proposals and rejections (verifies that did not accept all), each halved per
    # verify: p = hits / (hits + stops) is the chance the next proposal is accepted. One hit as
    # a prior: a new row is hopeful.
    hits: float = 1.0
    stops: float = 0.0

    @property
    def p(self) -> float:
        return self.hits / (self.hits + self.stops)


# ---------------------------------------------------------------------------
# Proposers: deterministic functions of a row's tokens, so every rank proposes the same
# ---------------------------------------------------------------------------


def ngram_lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (longest n first)
    and propose the k tokens that followed it, copied forward (so a loop of period p shorter
    than k is extended, as LZ77 copies overlap). A one-off lookup; rows keep their `NgramIndex`."""
    index = NgramIndex(n_min, n_max)
    return index.lookup(tokens, k)


class NgramIndex:
    """Where every n-gram (n_min <= n <= n_max) of one row's tokens last occurred, kept up to
    date as the row grows, so a lookup costs O(n_max) dictionary probes instead of a scan of
    the whole context (~0.3 ms at 100 tokens, ~1.6 ms at 4k with numpy, on every step of
    every speculating row: on a host-bound GPU step that is time taken from the device).

    `lookup(context, k)` expects each context to extend the previous one (a row's tokens only
    grow: rejected proposals never enter them); a context that does not is indexed afresh.
    """

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self._size = 0  # length of the last context indexed
        self._tail: list[int] = []  # its last n_max tokens, to check the next context extends it
        self._ends = 0  # n-grams ending before this position are in _last
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence

    def lookup(self, context: list[int], k: int) -> list[int]:
        size = len(context)
        if size < self.n_min + 1 or k <= 0:
            return []
        self._catch_up(context)
        for n in range(min(self.n_max, size - 1), self.n_min - 1, -1):
            start = self._last.get(tuple(context[size - n :]))
            if start is not None:
                begin = start + n
                out: list[int] = []
                for j in range(k):
                    i = begin + j
                    out.append(context[i] if i < size else out[i - size])
                return out
        return []

    def _catch_up(self, context: list[int]) -> None:
        """Index the n-grams that end before the context's last token (the lookup's own suffix
        must not find itself)."""
        size = len(context)
        if size < self._size or context[max(0, self._size - self.n_max) : self._size] != self._tail:
            self._ends, self._last = 0, {}  # not an extension: start over
        last = self._last
        for end in range(self._ends, size - 1):  # n-grams context[end-n+1 .. end]
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                last[tuple(context[end - n + 1 : end + 1])] = end - n + 1
        self._ends = max(self._ends, size - 1)
        self._size, self._tail = size, context[max(0, size - self.n_max) :]


class Proposer:
    """What the Speculator asks for proposals. Proposals must be a deterministic function of a
    row's tokens, so that every rank proposes the same without a word on the control bus."""

    def propose(self, uids: list[int], contexts: list[list[int]], ks: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def hopeful(self, uid: int, tokens: list[int]) -> bool:
        """Could a proposal follow `tokens` plus the row's pending token (still on the device)?
        False lets the step skip this row without waiting for that token."""
        return True

    def forget(self, live: set[int]) -> None:
        """Drop the state of rows that left the batch (`live`: the uids still in it)."""


class NgramProposer(Proposer):
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self._index: dict[int, NgramIndex] = {}  # uid -> its row's index

    def _row(self, uid: int) -> NgramIndex:
        index = self._index.get(uid)
        if index is None:
            index = self._index[uid] = NgramIndex(self.n_min, self.n_max)
        return index

    def propose(self, uids: list[int], contexts: list[list[int]], ks: list[int]) -> list[list[int]]:
        return [self._row(u).lookup(c, k) for u, c, k in zip(uids, contexts, ks)]

    def hopeful(self, uid: int, tokens: list[int]) -> bool:
        # A match of length n with the pending token appended needs the last n-1 known tokens
        # to recur. If no suffix of the known tokens of length >= n_min recurs, only a match of
        # the shortest length n_min is possible, and a loop starting there is caught a step later.
        return bool(self._row(uid).lookup(tokens, 1))

    def forget(self, live: set[int]) -> None:
        self._index = {u: i for u, i in self._index.items() if u in live}


class DraftProposer(Proposer):
    """A small model of the same vocabulary, whole on every rank, drafting greedily.

    Loaded whole rather than sharded: it is small, so its forward is cheap on one device, it
    needs no collective (a sharded draft would add K all_sums per layer per step), and greedy
    argmax over the same weights and tokens gives the same proposals on every rank.

    Each row has its own single-sequence cache: rows join, leave and diverge (rejections) at
    different times, and a draft cache only has to follow its row's tokens. Per step, the
    cache is trimmed to the longest common prefix with the row's tokens, fed the rest, then
    extended greedily k tokens.
    """

    def __init__(self, model, vocab_limit: int):
        self.model = model
        self.vocab_limit = vocab_limit  # a padded draft vocabulary can name ids the target lacks
        self._rows: dict[int, tuple[list, list[int]]] = {}  # uid -> (cache, tokens in it)

    def propose(self, uids: list[int], contexts: list[list[int]], ks: list[int]) -> list[list[int]]:
        return [self._one(u, c, k) if k > 0 else [] for u, c, k in zip(uids, contexts, ks)]

    def _one(self, uid: int, context: list[int], k: int) -> list[int]:
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        cache, seen = self._rows.get(uid) or (make_prompt_cache(self.model), [])
        common = 0
        for a, b in zip(seen, context[:-1]):  # feed at least the last token
            if a != b:
                break
            common += 1
        trim_prompt_cache(cache, len(seen) - common)
        seen, feed, out = context[:common], context[common:], []
        for _ in range(k):
            logits = self.model(mx.array(feed, dtype=mx.uint32)[None], cache=cache)[0, -1]
            seen = seen + feed
            token = int(mx.argmax(logits).item())
            if token >= self.vocab_limit:
                break
            out.append(token)
            feed = [token]
        self._rows[uid] = (cache, seen)  # what the cache holds: the context and out[:-1]
        return out

    def forget(self, live: set[int]) -> None:
        for uid in [u for u in self._rows if u not in live]:
            del self._rows[uid]


# ---------------------------------------------------------------------------
# The speculative step
# ---------------------------------------------------------------------------


def _tokens_left(batch, i: int) -> int:
    return batch.max_tokens[i] - batch._num_tokens[i]


class Speculator:
    def __init__(self, proposer, num_tokens: int, max_batch_size: int, cost: VerifyCost | None = None):
        self.proposer = proposer
        self.num_tokens = num_tokens
        self.max_batch_size = max_batch_size
        self.cost = cost or VerifyCost(num_tokens=num_tokens)
        self.stats = SpecStats()
        self._rows: dict[int, _RowState] = {}

    @property
    def pays(self) -> bool:
        """Whether a fully accepted verify of K yields more tokens than it costs. Where it does
        not, no row ever looks: no probes, no waits for pending tokens (the start-up log says so)."""
        return self.cost.best_k(1.0, self.num_tokens) > 0

    def reset_stats(self) -> None:
        self.stats = SpecStats()

    def step(self, batch) -> list | None:
        """One speculative step of `batch` (a DecodeBatch), or None to let it run a plain step."""
        chosen = self.choose(batch)
        if chosen is None:
            return None
        return self.verify(batch, *chosen)

    def verify(self, batch, last: list[int], proposals: list[list[int]], account: bool = True) -> list:
        """One verify forward over [last, proposals..] of every row, the cache rolled back past
        the rejected positions, and the responses. `account=False` (the cost measurement)
        leaves the counters and the rows' estimates alone."""
        accepted, targets, logprobs = self._verify(batch, last, proposals)
        if account:
            self.account(batch.uids, proposals, accepted)
        self._rollback(batch.prompt_cache, 1 + max(len(p) for p in proposals), [a + 1 for a in accepted])
        batch._arrays().counter = batch._arrays().counter + mx.array([a + 1 for a in accepted], dtype=mx.uint32)
        return self._emit(batch, last, proposals, accepted, targets, logprobs)

    def choose(self, batch) -> tuple[list[int], list[list[int]]] | None:
        """This step's inputs and every row's proposals ([] for rows that do not verify), or None
        when no row has any: then the batch runs a plain step."""
        n = len(batch.uids)
        if not (self.pays and n) or n > self.max_batch_size:
            return None
        if not all(type(c) is BatchKVCache for c in batch.prompt_cache):
            return None
        live = set(batch.uids)
        if any(u not in live for u in self._rows):
            self._forget(live)
        states = [self._state(u) for u in batch.uids]
        due = [self._due(batch, i, s) for i, s in enumerate(states)]
        # Waiting for the pending tokens drains the one-step-ahead pipeline: only rows whose
        # known tokens promise a proposal are worth it. The others look again next step (a
        # lookup is a few dictionary probes), with no back-off: finding nothing cost nothing.
        rows = [i for i in range(n) if due[i] and self.proposer.hopeful(batch.uids[i], batch.tokens[i])]
        if not rows:
            return None
        last = batch._next_tokens.tolist()  # this step's inputs (waits for the last step's sample)
        proposals = [[] for _ in range(n)]
        found = self.proposer.propose(
            [batch.uids[i] for i in rows],
            [batch.tokens[i] + [last[i]] for i in rows],
            [min(states[i].k, _tokens_left(batch, i) - 1) for i in rows],
        )
        for i, p in zip(rows, found):
            proposals[i] = p
            if not p:
                self._miss(states[i])
        if not any(proposals):
            return None
        return last, proposals

    def account(self, uids: list[int], proposals: list[list[int]], accepted: list[int]) -> None:
        """Counters, and each row's estimate and next number of proposals, after a verify."""
        for uid, p, a in zip(uids, proposals, accepted):
            if not p:
                continue
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(p)
            self.stats.num_accepted_tokens += a
            s = self._rows[uid]
            s.hits = 0.5 * s.hits + a
            s.stops = 0.5 * s.stops + (a < len(p))
            s.k = self.cost.best_k(s.p, self.num_tokens)
            if s.k:
                s.backoff = 1
            else:  # mostly rejected lately (free-form text): a verify would not pay for itself
                s.k = 1  # after sitting out, probe with one proposal
                self._miss(s)
        self.stats.spec_steps += 1

    def agree(self, agree_min) -> None:
        """Every rank takes the largest cost any rank measured (`agree_min`: the control bus's
        element-wise minimum over ranks), so every rank makes the same choices."""
        narrow, wide = (-v / 1000 for v in agree_min([-v for v in self.cost.permille()]))
        self.cost = VerifyCost(narrow, wide, self.num_tokens)

    def _state(self, uid: int) -> _RowState:
        s = self._rows.get(uid)
        if s is None:
            s = self._rows[uid] = _RowState(k=self.num_tokens)
        return s

    def _forget(self, live: set[int]) -> None:
        self._rows = {u: s for u, s in self._rows.items() if u in live}
        self.proposer.forget(live)

    @staticmethod
    def _due(batch, i: int, s: _RowState) -> bool:
        if s.wait > 0:
            s.wait -= 1
            return False
        row = batch.samplers[i]
        return row.constraint is None and not batch.logits_processors[i] and _tokens_left(batch, i) > 1

    @staticmethod
    def _miss(s: _RowState) -> None:
        s.wait = s.backoff
        s.backoff = min(2 * s.backoff, MAX_BACKOFF_STEPS)

    def _verify(self, batch, last: list[int], proposals: list[list[int]]):
        """One forward of the batch over [y, proposals..]: each row's accepted count, the target
        tokens of every position, and the log-probabilities (None when no row needs them)."""
        from mlx_cluster.engine.decode import _needs_sort, _sample_plain, _sample_sorted

        n = len(last)
        width = 1 + max(len(p) for p in proposals)
        inputs = [[y, *p] + [y] * (width - 1 - len(p)) for y, p in zip(last, proposals)]
        select_rows(batch.model, [getattr(r, "adapter", 0) for r in batch.samplers])  # each row's LoRA adapter
        logits = batch.model(mx.array(inputs, dtype=mx.uint32), cache=batch.prompt_cache)
        wants = any(r.params.logprobs for r in batch.samplers)
        constrained = [i for i, r in enumerate(batch.samplers) if r.constraint is not None]
        if not (wants or constrained or any(batch.logits_processors)) and all(r.params.greedy for r in batch.samplers):
            # All greedy: the plain step's own choice (argmax of the normalized log-probabilities,
            # in the model's dtype, so ties fall the same way) without the sampler's noise.
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            targets = mx.argmax(logprobs, axis=-1).tolist()
            return self._accepted(proposals, targets), targets, None
        first = logits[:, 0, :]
        token_context = []
        if any(batch.logits_processors):  # rows with processors use position 0 only, as a plain step
            first, token_context = batch._process(first, mx.array(last, dtype=mx.uint32))
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        first = first - mx.logsumexp(first, axis=-1, keepdims=True)
        if constrained:
            first = batch._mask(first, mx.array(last, dtype=mx.uint32), constrained)
        logprobs = mx.concatenate([first[:, None, :], logprobs[:, 1:, :]], axis=1)

        # Position j of row i is the row's token number counter + j: the plain step's noise.
        rows = batch._arrays()
        sample = _sample_sorted if _needs_sort(batch.samplers) else _sample_plain
        flat = [mx.repeat(getattr(rows, f), width) for f in ("inv_temp", "greedy", "top_p", "top_k", "min_p")]
        seeds = [mx.repeat(rows.seed_lo, width), mx.repeat(rows.seed_hi, width)]
        counter = mx.repeat(rows.counter, width) + mx.tile(mx.arange(width, dtype=mx.uint32), n)
        sampled = sample(logprobs.reshape(n * width, -1), *flat, *seeds, counter)
        mx.eval(sampled, token_context)
        targets = sampled.reshape(n, width).tolist()
        return self._accepted(proposals, targets), targets, logprobs if wants else None

    @staticmethod
    def _accepted(proposals: list[list[int]], targets: list[list[int]]) -> list[int]:
        """How many of each row's proposals equal the target's own choice, from the first on."""
        out = []
        for p, t in zip(proposals, targets):
            a = 0
            while a < len(p) and p[a] == t[a]:
                a += 1
            out.append(a)
        return out

    @staticmethod
    def _rollback(caches: list[BatchKVCache], width: int, kept: list[int]) -> None:
        """Drop the rejected tail of every row's new KV entries (see the module docstring)."""
        longest = max(kept)
        shift = [longest - k for k in kept]
        for c in caches:
            c.trim(width - longest)
            if any(shift):
                c.prepare(right_padding=shift)
                c.finalize()

    @staticmethod
    def _emit(batch, last, proposals, accepted, targets, logprobs) -> list:
        """Responses for y and the accepted proposals of every row; the batch's state follows."""
        wants = any(r.params.logprobs for r in batch.samplers)
        previous = batch._next_logprobs
        batch._current_tokens = mx.array(last, dtype=mx.uint32)
        batch._current_logprobs = previous
        batch._next_tokens = mx.array([t[a] for t, a in zip(targets, accepted)], dtype=mx.uint32)
        batch._next_logprobs = [logprobs[i, a] for i, a in enumerate(accepted)] if wants else [None] * len(last)
        responses, keep = [], []
        for i in range(len(batch.uids)):
            a = accepted[i]
            emitted = [last[i], *proposals[i][:a]]
            batch.tokens[i].extend(emitted)  # the tokens now in the KV cache
            finish = None
            for j, token in enumerate(emitted):
                lp = previous[i] if j == 0 else (logprobs[i, j - 1] if wants else None)
                batch._num_tokens[i] += 1
                if batch._num_tokens[i] >= batch.max_tokens[i]:
                    finish = "length"
                if batch._matchers[i].advance(token):
                    finish = "stop"
                done = finish is not None
                responses.append(
                    batch.Response(
                        uid=batch.uids[i],
                        token=token,
                        logprobs=lp,
                        finish_reason=finish,
                        prompt_cache=batch.extract_cache(i) if done else None,
                        all_tokens=batch.tokens[i] if done else None,
                    )
                )
                if done:
                    break
            if finish is None:
                keep.append(i)
        if len(keep) < len(batch.uids):
            batch.filter(keep)
        return responses


# ---------------------------------------------------------------------------
# Construction from the `speculative:` config section
# ---------------------------------------------------------------------------


class DraftModelError(ValueError):
    """The draft model cannot serve as this target's draft (named key, reason and fix)."""


def check_same_vocab(target_tokenizer, draft_tokenizer, draft_path: str) -> None:
    """Proposals are token ids: they only mean the same text when both tokenizers agree."""
    ours, theirs = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if ours == theirs:
        return
    differ = sorted(t for t in set(ours) | set(theirs) if ours.get(t) != theirs.get(t))
    raise DraftModelError(
        f"speculative.draft_model {draft_path!r}: its tokenizer differs from the target model's "
        f"({len(theirs)} vs {len(ours)} tokens, {len(differ)} differ, e.g. {differ[:3]}); "
        "a draft model must use the target's tokenizer (same family), or use method: ngram"
    )


def make_speculator(section, target_tokenizer, vocab_size: int, builtin_dir: str) -> Speculator | None:
    """The Speculator a `speculative:` section describes (None when the section is absent)."""
    if section is None:
        return None
    if section.method == "ngram":
        proposer = NgramProposer(section.prompt_lookup_min, section.prompt_lookup_max)
    else:
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
        from mlx_lm.utils import load

        from mlx_cluster.models.builtin import resolve_model_path

        path = resolve_model_path(section.draft_model, builtin_dir)
        try:
            model, tokenizer = load(path)
        except Exception as e:  # a missing directory, an unknown repo, an unsupported architecture
            raise DraftModelError(f"speculative.draft_model {section.draft_model!r}: cannot load it ({e})") from e
        if not can_trim_prompt_cache(make_prompt_cache(model)):
            raise DraftModelError(
                f"speculative.draft_model {section.draft_model!r}: its cache cannot be rolled back "
                "(sliding-window or recurrent layers); choose a draft model with plain attention"
            )
        check_same_vocab(target_tokenizer, tokenizer, section.draft_model)
        proposer = DraftProposer(model, vocab_size)
        log.info("draft model %s loaded whole on this rank", section.draft_model)
    log.info(
        "speculative decoding: %s, up to %d tokens, while at most %d rows run",
        section.method,
        section.num_tokens,
        section.max_batch_size,
    )
    pinned = VerifyCost(*section.verify_cost, section.num_tokens) if section.verify_cost else None
    return Speculator(proposer, section.num_tokens, section.max_batch_size, pinned)
