"""A rank started as a child process on this machine.

The child runs in its own session (Ctrl-C in the launcher's terminal reaches only the
launcher, which then drains the group in order), and dies with the launcher: on Linux through
PR_SET_PDEATHSIG, everywhere through the rank's own parent-pid watch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from mlx_cluster.config import HostSection


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class LocalRankProcess:
    def __init__(
        self,
        rank: int,
        host: HostSection,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        on_line: Callable[[int, str, str], None],
        pass_fds: tuple[int, ...] = (),
    ):
        self.rank = rank
        self.host = host
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.on_line = on_line
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        env = {**self.env, "MLX_CLUSTER_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=os.path.expanduser(self.cwd) if self.cwd else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            pass_fds=self.pass_fds,
        )
        self._reader = threading.Thread(target=self._read, name=f"rank{self.rank}-out", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.on_line(self.rank, self.host.host, raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait(self, timeout_s: float | None) -> int | None:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
