"""Turns a sequence's tokens into text deltas on rank 0, honouring stop strings.

A stop string may arrive split across tokens, so text that could still turn out to be the
start of a stop string is held back until it cannot, and the stop string itself is never
sent. Special tokens (chat markers, EOS) are not part of the visible text.
"""

from __future__ import annotations


class TextAssembler:
    def __init__(self, detokenizer, stop: list[str], hidden_token_ids: set[int]):
        self.detokenizer = detokenizer
        self.stop = [s for s in stop if s]
        self.hold_chars = max((len(s) for s in self.stop), default=1) - 1
        self.hidden = hidden_token_ids
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string matched; nothing after it is ever released
        self.matched: str | None = None  # which one

    def add(self, token: int) -> tuple[str, bool]:
        """Feed one token; returns (text that may be sent now, whether a stop string matched)."""
        if self.stopped:
            return "", True
        if token not in self.hidden:
            self.detokenizer.add_token(token)
            self.text += self.detokenizer.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back once the sequence has ended for another reason."""
        if self.stopped:
            return ""
        self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        delta, _ = self._release(final=True)
        return delta

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.sent - self.hold_chars)
            hits = [(i, s) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                end, self.matched = min(hits)
                delta = self.text[self.sent : end]
                self.text = self.text[:end]
                self.sent = end
                self.stopped = True
                return delta, True
        end = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.hold_chars)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta, False
