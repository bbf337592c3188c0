"""Per-sequence token constraints, built on every rank from a grammar string.

Rank 0 compiles a request's response format or tool signature into an llguidance grammar
string (`constrain/grammar.py`); the string travels in the plan's `NewSequence.grammar`, and
every rank builds its own `TokenConstraint` from it and the tokenizer. llguidance is
deterministic, so the same grammar and the same sampled tokens give the same mask on every
rank (the plan's token digest would catch a rank that disagreed).

The mask is computed on the host (llguidance's bitmask, unpacked with numpy) and applied with
plain mx ops, so nothing here is Metal-only: the same code runs on CPU, Metal and CUDA.
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

log = logging.getLogger(__name__)

_lock = threading.Lock()
_ll_tokenizers: dict[tuple[int, int], tuple[weakref.ref, object]] = {}
_installed: tuple[object, int] | None = None


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` with `vocab_size` mask entries (the logits width).

    Building one walks the whole vocabulary (up to ~1 s for large vocabularies), so it is done
    once per tokenizer and process.
    """
    key = (id(tokenizer), vocab_size)
    with _lock:
        ref, found = _ll_tokenizers.get(key, (None, None))
        # An id can be reused once its object is gone (several models unload and reload theirs):
        # an entry counts only while its own tokenizer is alive, and dead ones are dropped.
        if found is None or ref() is not tokenizer:
            import llguidance.hf

            hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper wraps the HF one
            eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
            found = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos)
            for dead in [k for k, (r, _) in _ll_tokenizers.items() if r() is None]:
                del _ll_tokenizers[dead]
            _ll_tokenizers[key] = (weakref.ref(tokenizer), found)
        return found


class TokenConstraint:
    """The grammar state of one sequence: which tokens may come next.

    The decode step calls `allowed_tokens()` before sampling and `consume()` with the token it
    sampled. A grammar that dead-ends (or that is complete) allows only the end-of-sequence
    tokens, so the sequence ends cleanly instead of wedging the batch.
    """

    def __init__(self, matcher, vocab_size: int, eos_ids: list[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._eos_only = np.zeros(vocab_size, dtype=bool)
        self._eos_only[[t for t in eos_ids if 0 <= t < vocab_size]] = True
        self._reported = False
        if matcher.is_error():
            self._report()

    def allowed_tokens(self) -> np.ndarray | None:
        """Bool mask over the vocabulary for the next token; None when every token is allowed."""
        if self.matcher.is_error():
            return self._eos_only
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, count=self.vocab_size, bitorder="little").view(bool)
        if not mask.any():  # a dead end: let the sequence end instead of sampling from nothing
            self._report()
            return self._eos_only
        return None if mask.all() else mask

    def consume(self, token: int) -> None:
        """Advance with the token that was actually sampled."""
        if self.matcher.is_error() or self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(int(token)):
            self._report()

    @property
    def finished(self) -> bool:
        """The grammar is complete or dead-ended: the sequence should stop."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            log.warning("a constrained sequence reached a dead end: %s", self.matcher.get_error() or "no token allowed")


def make_constraint(grammar: str, tokenizer, vocab_size: int) -> TokenConstraint:
    """Build the constraint of one sequence. Never raises for a bad grammar (rank 0 validated it
    before admitting the request); a matcher in error simply allows only end-of-sequence."""
    import llguidance

    ll = ll_tokenizer(tokenizer, vocab_size)
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    return TokenConstraint(matcher, vocab_size, list(ll.eos_tokens))


def install(tokenizer, vocab_size: int) -> None:
    """Tell this rank which tokenizer its sequences' grammars are built against (once, at load)."""
    global _installed
    _installed = (tokenizer, vocab_size)
    ll_tokenizer(tokenizer, vocab_size)  # pay the vocabulary walk now, not on the first request


def sequence_constraint(grammar: str) -> TokenConstraint | None:
    """The constraint of a sequence joining the batch: None when it is unconstrained."""
    if not grammar:
        return None
    assert _installed is not None, "constrain.install() must run before a constrained sequence arrives"
    tokenizer, vocab_size = _installed
    return make_constraint(grammar, tokenizer, vocab_size)
