"""`mlx-cluster up` on a terminal: one progress bar per rank while the weights load.

Ranks log `weights: X of Y MB (P%)` (models/load_progress.py). On a terminal the launcher keeps
those off the scroll and redraws a status line at the bottom (one bar per loading rank); any
other line is printed above it. Not on a terminal (a pipe, a service's journal) every line is
printed as it came, so logs stay plain text.
"""

from __future__ import annotations

import shutil
import sys

from mlx_cluster.models.load_progress import parse

BAR_WIDTH = 20


def bar(done: float, total: float, width: int = BAR_WIDTH) -> str:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    full = int(frac * width)
    return "#" * full + "-" * (width - full) + f" {frac * 100:3.0f}% {done:.0f}/{total:.0f} MB"


class ProgressDisplay:
    def __init__(self, out=sys.stdout, tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.loading: dict[int, tuple[float, float]] = {}
        self._drawn = False

    def line(self, rank: int | str | None, text: str) -> None:
        """A line from a rank (or another source named by a string; None: a line that is never
        progress): a progress update or a line to print."""
        progress = parse(text) if rank is not None else None
        if progress is None or not self.tty:
            self._clear()
            print(text, file=self.out, flush=True)
            self._draw()
            return
        done, total = progress
        if done >= total:
            self.loading.pop(rank, None)
            self._clear()
            print(text, file=self.out, flush=True)  # the final figure stays in the scroll
        else:
            self.loading[rank] = progress
            self._clear()
        self._draw()

    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self._drawn = False

    def _draw(self) -> None:
        if not (self.tty and self.loading):
            return
        parts = [f"{_label(key)} [{bar(*p)}]" for key, p in sorted(self.loading.items(), key=lambda kv: str(kv[0]))]
        width = shutil.get_terminal_size().columns - 1  # one line, or \r cannot clear it
        self.out.write(("loading " + "  ".join(parts))[:width])
        self.out.flush()
        self._drawn = True


def _label(key) -> str:
    return f"rank {key}" if isinstance(key, int) else str(key)


def show_progress_of_this_process(out=sys.stderr) -> None:
    """`mlx-cluster make-model`: draw this process's own progress lines (models/load_progress.py)."""
    import logging

    display = ProgressDisplay(out)

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            display.line("make-model", record.getMessage())

    logger = logging.getLogger("mlx_cluster.load")
    logger.addHandler(Handler())
    logger.setLevel(logging.INFO)
