"""The first thing that runs on a remote host: sets up env and cwd, then becomes the rank.

The SSH launcher (`mlx_cluster.launcher.ssh`) runs

    exec <python> -m mlx_cluster.launcher.remote_boot

with no arguments and no environment on the command line, because command lines are
visible to every user of the remote machine (`ps`, /proc/<pid>/cmdline) and the
environment may hold secrets such as an API key. Instead the launcher writes ONE JSON
line to the channel's stdin:

    {"env": {"NAME": "value", ...}, "cwd": "/path" or null, "argv": ["python3", "-m", ...]}

This module reads exactly that line (byte by byte, so nothing after it is swallowed),
applies env and cwd, prints `MLXC-PID <pid>` to stdout so the launcher learns the remote
pid, and then `os.execvp`s argv. The pid stays the same across exec, so the reported pid
is the rank's. The rank inherits stdin, which is still the SSH channel: when the launcher
goes away the connection closes and stdin reaches EOF. A rank started with
MLX_CLUSTER_WATCH_STDIN=1 calls `watch_stdin_and_exit()` to turn that EOF into its exit,
so no orphaned ranks are left behind on remote hosts.

Standard library only: this runs before anything else and must not pull in MLX.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import NoReturn

PID_MARKER = "MLXC-PID"
WATCH_STDIN_ENV = "MLX_CLUSTER_WATCH_STDIN"
MAX_SPEC_BYTES = 4 << 20  # a boot line larger than this is a launcher bug, not a config

# Exit codes used before exec, so the launcher can tell a boot failure from a rank failure.
EXIT_BAD_SPEC = 2
EXIT_NO_CWD = 3
EXIT_EXEC_FAILED = 127


def _fail(code: int, message: str) -> NoReturn:
    sys.stderr.write(f"mlx-cluster remote_boot on {socket.gethostname()}: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def read_spec_line(fd: int = 0) -> bytes:
    """Read one line from fd without reading past its newline.

    A buffered reader (sys.stdin) would read ahead and the exec'd rank would lose those
    bytes; reading one byte at a time is slow but the line is small and read once.
    """
    data = bytearray()
    while len(data) < MAX_SPEC_BYTES:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            break
        data += byte
    return bytes(data)


def parse_spec(line: bytes) -> tuple[dict[str, str], str | None, list[str]]:
    """Validate the boot line; raises ValueError with a readable reason."""
    if not line.strip():
        raise ValueError("no boot line on stdin (this module is started by `mlx-cluster up`, not by hand)")
    spec = json.loads(line)
    if not isinstance(spec, dict):
        raise ValueError("the boot line must be a JSON object")
    env = spec.get("env") or {}
    cwd = spec.get("cwd")
    argv = spec.get("argv")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("env must map names to strings")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError("cwd must be a string or null")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    return env, cwd, argv


def main() -> None:
    try:
        env, cwd, argv = parse_spec(read_spec_line())
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        _fail(EXIT_BAD_SPEC, f"bad boot line: {e}")
    os.environ.update(env)
    if cwd:
        path = os.path.expanduser(cwd)
        try:
            os.chdir(path)
        except OSError as e:
            _fail(
                EXIT_NO_CWD, f"cannot change to working directory {path!r} ({e.strerror}); create it or fix cluster.cwd"
            )
    # The marker must reach the launcher before exec replaces this process's buffers.
    sys.stdout.write(f"{PID_MARKER} {os.getpid()}\n")
    sys.stdout.flush()
    try:
        os.execvp(os.path.expanduser(argv[0]), argv)  # cluster.python may be "~/venv/bin/python"
    except OSError as e:
        _fail(EXIT_EXEC_FAILED, f"cannot run {argv[0]!r}: {e.strerror}")


def watch_stdin_and_exit(exit_code: int = 1, *, force: bool = False) -> bool:
    """Exit the process (os._exit) as soon as stdin reaches EOF; returns whether it watches.

    Call this early in a rank. It only starts watching when MLX_CLUSTER_WATCH_STDIN=1
    (set by the SSH launcher, whose channel is the rank's stdin) unless `force` is true:
    a rank started locally may have /dev/null as stdin, which is at EOF immediately.

    The watch is a daemon thread that reads and discards fd 0. os._exit is used on
    purpose: the launcher is gone, nobody reads our output any more, and a normal
    shutdown could block on collectives with peers that are gone too.
    """
    if not force and os.environ.get(WATCH_STDIN_ENV) != "1":
        return False

    def watch() -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass  # stdin closed under us: the same as EOF
        os._exit(exit_code)

    threading.Thread(target=watch, name="mlx-cluster-stdin-watch", daemon=True).start()
    return True


if __name__ == "__main__":
    main()
