"""Keeps a rank from hanging: stalled collectives, a vanished launcher.

mx.distributed collectives have no timeout, and a stopped or wedged peer is never detected
(only a killed one is). The engine stamps when each bus exchange or model step begins; this
thread ends the process when one runs past `collective_timeout_s`, after giving rank 0 a
moment to fail its in-flight requests cleanly. It also ends the rank when the launcher that
started it is gone, so no rank is ever orphaned.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_STALLED = 75
EXIT_ORPHANED = 76
POLL_S = 0.25  # how often the watchdog looks: part of the stall-detection bound (README, "Failures")


class Watchdog:
    def __init__(
        self,
        timer,
        timeout_s: float,
        on_fatal: Callable[[str], None],
        parent_pid: int | None,
        watch_stdin: bool = False,
        poll_s: float = POLL_S,
    ):
        self.timer = timer
        self.timeout_s = timeout_s
        self.on_fatal = on_fatal
        self.parent_pid = parent_pid
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        if watch_stdin:
            # Remote ranks: stdin is the SSH channel; EOF means the launcher's connection is gone.
            threading.Thread(target=self._watch_stdin, name="stdin-watch", daemon=True).start()

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._die("the launcher that started this rank is gone", EXIT_ORPHANED)
            since = self.timer.busy_since
            if since and time.monotonic() - since > self.timeout_s:
                self._die(
                    f"{self.timer.phase} step stalled for more than {self.timeout_s:.0f} s "
                    "(supervisor.collective_timeout_s): a peer is stopped or wedged",
                    EXIT_STALLED,
                )

    def _watch_stdin(self) -> None:
        # os.read on the descriptor, not sys.stdin.buffer: a thread blocked in a BufferedReader
        # holds its lock, and a rank exiting normally then aborts at interpreter shutdown
        # ("Fatal Python error: _enter_buffered_busy", exit 134), seen on every SSH-launched
        # rank at `down` (benchmarks/chaos.py --kinds partition).
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except (OSError, ValueError):
            pass
        self._die("the launcher's SSH connection closed", EXIT_ORPHANED)

    def _die(self, reason: str, code: int) -> None:
        log.error("watchdog: %s; stopping this rank", reason)
        try:
            self.on_fatal(reason)
        finally:
            os._exit(code)
