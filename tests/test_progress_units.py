"""Weight-loading progress: the ranks' lines and the launcher's bars (terminal) or plain lines (pipe)."""

from __future__ import annotations

import io
import logging

from mlx_cluster.launcher.progress import ProgressDisplay, bar
from mlx_cluster.models.load_progress import LoadProgress, parse


def test_a_rank_logs_its_progress_at_most_once_per_interval_and_at_the_end(caplog):
    now = [0.0]
    progress = LoadProgress(100e6, interval_s=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mlx_cluster.load"):
        progress.update(10e6)  # within the first interval: nothing
        now[0] = 1.5
        progress.update(40e6)
        progress.update(50e6)  # too soon after the last line
        progress.update(100e6, final=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["weights: 40.0 of 100.0 MB (40%)", "weights: 100.0 of 100.0 MB (100%)"]
    assert parse("[rank 1 h] 2026 INFO mlx_cluster.load: " + lines[0]) == (40.0, 100.0)
    assert parse("something else") is None


def test_on_a_terminal_progress_lines_become_one_redrawn_bar_per_rank():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    display.line(0, "[rank 0 a] weights: 10.0 of 100.0 MB (10%)")
    display.line(1, "[rank 1 b] weights: 50.0 of 100.0 MB (50%)")
    display.line(None, "mlx-cluster: something happened")
    display.line(0, "[rank 0 a] weights: 100.0 of 100.0 MB (100%)")
    text = out.getvalue()
    assert "rank 0 [" + bar(10, 100) + "]" in text and "rank 1 [" + bar(50, 100) + "]" in text
    assert "\r\x1b[K" in text  # the bar line is cleared before another line is printed
    assert "mlx-cluster: something happened\n" in text
    assert "weights: 10.0 of 100.0" not in text  # intermediate figures stay off the scroll
    assert text.endswith("loading rank 1 [" + bar(50, 100) + "]")  # rank 0 is done, rank 1 still loads
    assert "[rank 0 a] weights: 100.0 of 100.0 MB (100%)\n" in text


def test_not_on_a_terminal_every_line_is_printed_as_it_came():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False)
    lines = ["[rank 0 a] weights: 10.0 of 100.0 MB (10%)", "mlx-cluster: ready"]
    display.line(0, lines[0])
    display.line(None, lines[1])
    assert out.getvalue() == "\n".join(lines) + "\n"
