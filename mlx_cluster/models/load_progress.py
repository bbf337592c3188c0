"""Weight-loading progress as log lines the launcher can turn into a progress bar.

A rank logs `weights: <read> of <total> MB (<pct>%)` at most once per interval and once at the
end (`writing weights: ...` while it writes a built-in model); `mlx-cluster up` draws one bar per rank from these lines on a terminal
(launcher/progress.py) and prints them as they are otherwise, so logs and pipes stay plain.
"""

from __future__ import annotations

import logging
import re
import time

log = logging.getLogger("mlx_cluster.load")

LINE = re.compile(r"weights: ([0-9.]+) of ([0-9.]+) MB \(")
INTERVAL_S = 1.0


class LoadProgress:
    def __init__(self, total_bytes: int, what: str = "weights", interval_s: float = INTERVAL_S, clock=time.monotonic):
        self.total = max(1, int(total_bytes))
        self.what = what  # "weights" (a rank loading) or "writing weights" (a built-in model being made)
        self.interval_s = interval_s
        self.clock = clock
        self._last = clock()

    def update(self, done_bytes: int, final: bool = False) -> None:
        now = self.clock()
        if final or now - self._last >= self.interval_s:
            self._last = now
            done = min(done_bytes, self.total)
            log.info("%s: %.1f of %.1f MB (%d%%)", self.what, done / 1e6, self.total / 1e6, 100 * done // self.total)


def parse(line: str) -> tuple[float, float] | None:
    """(MB read, MB in all) from a rank's progress line, or None."""
    m = LINE.search(line)
    return (float(m.group(1)), float(m.group(2))) if m else None
