"""A dependency-free progress line on stderr, rewritten in place with a carriage return."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts finished requests of one phase and redraws `label: [####....] 12/32 ...`.

    Disabled (draws nothing) when `enabled` is false; by default it is enabled only when the
    stream is a terminal, so logs and pipes never fill with carriage returns.
    """

    BAR = 24

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = self.errors = 0
        self.start = time.perf_counter()
        self._draw()

    def update(self, success: bool) -> None:
        """Record one finished request and redraw."""
        self.done += 1
        self.errors += not success
        self._draw()

    def close(self) -> None:
        """End the line so later output starts on a fresh one."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = self.BAR * self.done // self.total if self.total else self.BAR
        bar = "#" * filled + "." * (self.BAR - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label}: [{bar}] {self.done}/{self.total}  errors {self.errors}  {elapsed:.1f} s")
        self.stream.flush()
