"""Rank processes on other machines, started and controlled over SSH with paramiko.

`RemoteRankProcess` has the same shape as the local rank process (start, pid, poll,
wait, signal, kill, close), so the supervisor does not care where a rank runs.

How a remote rank starts (see `mlx_cluster.launcher.remote_boot`):

1. connect with paramiko, checking the host key against known_hosts;
2. open a session channel, without a PTY, and run
   `exec <python> -m mlx_cluster.launcher.remote_boot`: nothing secret on the
   command line, which any user of the remote host can read;
3. send one JSON line {"env", "cwd", "argv"} on the channel's stdin;
4. remote_boot applies it, prints `MLXC-PID <pid>`, and execs the rank, which keeps the
   channel as its stdin. When the launcher dies the connection closes, stdin reaches
   EOF, and a rank that called `remote_boot.watch_stdin_and_exit()` exits.

Exit codes follow `subprocess`: the remote exit status, `-SIG` when the rank died from a
signal this object sent, and 255 (like the `ssh` command) when the connection was lost
or the rank died from a signal someone else sent (paramiko drops the `exit-signal`
message, so the signal itself is unknown).
"""

from __future__ import annotations

import collections
import getpass
import json
import logging
import os
import re
import shlex
import signal as signal_module
import socket
import threading
import time
from collections.abc import Callable

import paramiko

from mlx_cluster.config import HostSection, SshSection
from mlx_cluster.launcher.remote_boot import PID_MARKER, WATCH_STDIN_ENV

log = logging.getLogger(__name__)

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
CONNECTION_LOST = 255  # what `ssh` itself returns when the connection fails
BOOT_TIMEOUT_S = 30.0  # from exec to the pid marker: a cold Python start on a slow disk
KEEPALIVE_S = 5  # SSH-level keepalive, so a silent dead peer is noticed ...
TCP_USER_TIMEOUT_MS = 30_000  # ... once its unacknowledged keepalives pass this (Linux)
COMMAND_TIMEOUT_S = 10.0  # for the short helper commands (kill, ps)
MAX_LINE_BYTES = 64 << 10  # a longer line is passed on in pieces

_PID_LINE = re.compile(rf"^{PID_MARKER} (\d+)$")


class RemoteLaunchError(RuntimeError):
    """Starting or reaching a remote rank failed; the message says what to fix."""


# ---------------------------------------------------------------------------- connecting


def _known_hosts_hint(hostname: str, ssh: SshSection) -> str:
    port = "" if ssh.port == 22 else f"-p {ssh.port} "
    return f"`ssh-keyscan {port}-H {hostname} >> {ssh.known_hosts}`"


class _RejectUnknownHost(paramiko.MissingHostKeyPolicy):
    """Like paramiko's RejectPolicy, but the error says which host and how to fix it."""

    def __init__(self, ssh: SshSection):
        self._ssh = ssh

    def missing_host_key(self, client, hostname, key):
        raise RemoteLaunchError(
            f"host key of {hostname} is not in {self._ssh.known_hosts} "
            f"(the host offered {key.get_name()} {key.fingerprint}); add it with "
            f"{_known_hosts_hint(hostname, self._ssh)} after verifying it, "
            "or set ssh.strict_host_keys: false"
        )


class _AcceptUnknownHost(paramiko.AutoAddPolicy):
    """strict_host_keys: false. Accepts the key for this connection only.

    AutoAddPolicy would save the key if the client had a host-keys file to save to; ours
    never has one (known_hosts is loaded as "system" keys), so nothing is written.
    """

    def missing_host_key(self, client, hostname, key):
        log.warning(
            "accepting unverified host key of %s (%s %s) because ssh.strict_host_keys is false",
            hostname,
            key.get_name(),
            key.fingerprint,
        )
        super().missing_host_key(client, hostname, key)


def _load_known_hosts(client: paramiko.SSHClient, ssh: SshSection) -> None:
    for path in (os.path.expanduser(ssh.known_hosts), SYSTEM_KNOWN_HOSTS):
        if not os.path.exists(path):
            continue  # a missing file is an empty one: unknown hosts then hit the policy
        try:
            # "System" host keys are never written back by paramiko, unlike load_host_keys().
            client.load_system_host_keys(path)
        except OSError as e:
            raise RemoteLaunchError(f"cannot read known hosts file {path}: {e.strerror}") from e


def connect(host: HostSection, ssh: SshSection) -> paramiko.SSHClient:
    """An authenticated SSH connection to host, or RemoteLaunchError saying why not."""
    user = ssh.user or getpass.getuser()
    where = f"{user}@{host.host}:{ssh.port}"
    client = paramiko.SSHClient()
    try:
        _load_known_hosts(client, ssh)
        if ssh.strict_host_keys:
            client.set_missing_host_key_policy(_RejectUnknownHost(ssh))
        else:
            client.set_missing_host_key_policy(_AcceptUnknownHost())
        if ssh.key_file:
            if not os.path.exists(os.path.expanduser(ssh.key_file)):
                raise RemoteLaunchError(f"ssh.key_file {ssh.key_file} does not exist")
            auth = {"key_filename": os.path.expanduser(ssh.key_file), "allow_agent": False, "look_for_keys": False}
            tried = f"key {ssh.key_file}"
        else:
            auth = {"allow_agent": True, "look_for_keys": True}
            tried = "the SSH agent and the default keys in ~/.ssh"
        timeout = ssh.connect_timeout_s
        client.connect(
            host.host,
            port=ssh.port,
            username=user,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            **auth,
        )
    except RemoteLaunchError:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise RemoteLaunchError(
            f"host key of {e.hostname} has CHANGED: it offered {e.key.get_name()} {e.key.fingerprint}, "
            f"but known_hosts has {e.expected_key.fingerprint}. This can be a machine-in-the-middle attack, "
            "or the host was reinstalled; if you are sure it is the latter, remove the old key with "
            f"`ssh-keygen -R {e.hostname} -f {ssh.known_hosts}` and add the new one with "
            f"{_known_hosts_hint(e.hostname, ssh)}"
        ) from None
    except paramiko.PasswordRequiredException as e:
        client.close()
        raise RemoteLaunchError(
            f"{where}: key {ssh.key_file} is encrypted ({e}); load it into ssh-agent and unset ssh.key_file"
        ) from None
    except paramiko.AuthenticationException as e:
        client.close()
        raise RemoteLaunchError(
            f"{where}: authentication failed with {tried} ({e}); check ssh.user, ssh.key_file and the "
            "remote ~/.ssh/authorized_keys"
        ) from None
    except paramiko.ssh_exception.NoValidConnectionsError as e:  # refused, unreachable (all addresses)
        client.close()
        reasons = sorted({err.strerror or str(err) for err in e.errors.values()})
        raise RemoteLaunchError(
            f"cannot connect to {where}: {'; '.join(reasons)} (is sshd running there, and ssh.port right?)"
        ) from None
    except TimeoutError:
        client.close()
        raise RemoteLaunchError(
            f"cannot connect to {where}: no answer within ssh.connect_timeout_s={ssh.connect_timeout_s:g} s "
            "(is the host up and reachable?)"
        ) from None
    except (paramiko.SSHException, OSError) as e:  # DNS failures, resets, protocol errors
        client.close()
        raise RemoteLaunchError(f"cannot connect to {where}: {e or type(e).__name__}") from None
    _tune_transport(client.get_transport())
    return client


def _tune_transport(transport: paramiko.Transport) -> None:
    """Make a host that vanishes (power, cable) show up as a dead connection in ~30 s.

    Without this, TCP waits many minutes before giving up on a silent peer, and a rank on
    that host would look alive all the while.
    """
    transport.set_keepalive(KEEPALIVE_S)
    tcp_user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
    if tcp_user_timeout is not None:
        try:
            transport.sock.setsockopt(socket.IPPROTO_TCP, tcp_user_timeout, TCP_USER_TIMEOUT_MS)
        except OSError:
            pass  # not a TCP socket (e.g. a proxy): keep the defaults


def _kill_command(pid: int, sig: int) -> str:
    if pid <= 1:
        # `kill -s KILL -1` would kill every process of the user: never send that.
        raise ValueError(f"refusing to signal pid {pid}")
    if sig == 0:
        return f"kill -0 {pid}"
    try:
        # By name: numbers differ between Linux and macOS (SIGUSR1 is 10 vs 30).
        name = signal_module.Signals(sig).name.removeprefix("SIG")
    except ValueError:
        return f"kill -{int(sig)} {pid}"
    return f"kill -s {name} {pid}"


def _run_command(transport: paramiko.Transport, command: str, timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, str]:
    """Run a short command on its own channel; returns (exit status, stdout+stderr)."""
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        chan.shutdown_write()
        out = bytearray()
        while data := chan.recv(65536):
            out += data
        chan.status_event.wait(timeout)
        return chan.exit_status, out.decode("utf-8", "replace")
    finally:
        chan.close()


def kill_remote(host: HostSection, ssh: SshSection, pid: int, sig: int, match: str | None = None) -> bool:
    """Send sig to pid on host; returns whether the process existed.

    Used by `mlx-cluster down` from another terminal, with a pid recorded at `up`. When
    `match` is given, the process is only signalled if its command line contains it,
    which guards against a recycled pid now belonging to something else.
    """
    command = _kill_command(pid, sig)
    client = connect(host, ssh)
    try:
        transport = client.get_transport()
        if match is not None:
            rc, out = _run_command(transport, f"ps -p {pid} -o command=")
            if rc != 0 or match not in out:
                return False
        rc, out = _run_command(transport, command)
    except (paramiko.SSHException, OSError) as e:
        raise RemoteLaunchError(f"{host.host}: `{command}` failed: {e or type(e).__name__}") from None
    finally:
        client.close()
    if rc == 0:
        return True
    if "no such process" in out.lower():
        return False
    raise RemoteLaunchError(f"{host.host}: `{command}` failed with status {rc}: {out.strip()}")


# ------------------------------------------------------------------------ the rank process


class RemoteRankProcess:
    """One rank running on another host, started through remote_boot over SSH.

    argv[0] is the remote Python (cluster.python or "python3"); it also runs remote_boot.
    env is applied on top of the remote login environment (pass the cluster's variables,
    not the local environment). on_line(rank, host, line) is called from reader threads,
    one call at a time, for every line the rank prints on stdout or stderr.
    """

    def __init__(
        self,
        rank: int,
        host: HostSection,
        ssh: SshSection,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        on_line: Callable[[int, str, str], None],
    ):
        if not argv:
            raise ValueError("argv must name the program to run")
        self.rank = rank
        self.host = host
        self.ssh = ssh
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.on_line = on_line
        self._client: paramiko.SSHClient | None = None
        self._channel: paramiko.Channel | None = None
        self._readers: list[threading.Thread] = []
        self._pid: int | None = None
        self._pid_seen = threading.Event()
        self._early_lines: collections.deque[str] = collections.deque(maxlen=20)  # for boot errors
        self._emit_lock = threading.Lock()
        self._last_signal: int | None = None
        self._returncode: int | None = None

    def __repr__(self) -> str:
        return f"<RemoteRankProcess rank={self.rank} host={self.host.host} pid={self._pid}>"

    @property
    def pid(self) -> int | None:
        """The pid of the rank on the remote host (known once start() returns)."""
        return self._pid

    def boot_command(self) -> str:
        """The remote command line: only the interpreter path, never env values."""
        python = shlex.quote(self.argv[0])
        if self.argv[0].startswith("~/"):  # quoting would stop the shell from expanding ~
            python = '"$HOME"/' + shlex.quote(self.argv[0][2:])
        return f"exec {python} -m mlx_cluster.launcher.remote_boot"

    def boot_line(self) -> bytes:
        env = dict(self.env)
        env[WATCH_STDIN_ENV] = "1"  # its stdin is our channel: EOF means the launcher is gone
        # Over SSH stdout is a pipe, so Python would block-buffer the rank's log lines.
        env.setdefault("PYTHONUNBUFFERED", "1")
        return (json.dumps({"env": env, "cwd": self.cwd, "argv": self.argv}) + "\n").encode()

    def start(self) -> None:
        """Connect, start the rank, and wait until it reports its pid."""
        if self._client is not None:
            raise RuntimeError(f"rank {self.rank} was already started")
        self._client = connect(self.host, self.ssh)
        try:
            chan = self._client.get_transport().open_session(timeout=self.ssh.connect_timeout_s)
            # No get_pty(): a PTY would merge stderr into stdout, echo the boot line (with
            # its secrets) back, and turn stdin EOF into a hangup we do not control.
            chan.exec_command(self.boot_command())
            self._channel = chan
            self._readers = [
                threading.Thread(target=self._pump, args=(recv, is_stdout), name=name, daemon=True)
                for recv, is_stdout, name in (
                    (chan.recv, True, f"rank{self.rank}-stdout"),
                    (chan.recv_stderr, False, f"rank{self.rank}-stderr"),
                )
            ]
            for reader in self._readers:
                reader.start()
            chan.sendall(self.boot_line())
            self._await_pid()
        except (paramiko.SSHException, OSError) as e:
            self.close()
            raise RemoteLaunchError(f"rank {self.rank} on {self.host.host}: {e or type(e).__name__}") from None
        except BaseException:
            self.close()
            raise

    def _await_pid(self) -> None:
        timeout_s = max(BOOT_TIMEOUT_S, self.ssh.connect_timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self._pid_seen.wait(0.05):
            chan = self._channel
            if chan.exit_status_ready():
                for reader in self._readers:  # collect the last words for the error
                    reader.join(timeout=1.0)
                code = self.poll()
                output = "\n".join(f"    {line}" for line in self._early_lines) or "    (no output)"
                raise RemoteLaunchError(
                    f"rank {self.rank} on {self.host.host}: `{self.boot_command()}` exited with status {code} "
                    f"before starting the rank; its output:\n{output}"
                )
            if time.monotonic() > deadline:
                raise RemoteLaunchError(
                    f"rank {self.rank} on {self.host.host}: no pid reported within {timeout_s:.0f} s "
                    f"by `{self.boot_command()}`"
                )

    def _pump(self, recv: Callable[[int], bytes], is_stdout: bool) -> None:
        """Read one stream of the channel until EOF, emitting complete lines."""
        pending = b""
        while True:
            try:
                data = recv(65536)
            except (OSError, EOFError, paramiko.SSHException):
                break
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE_BYTES:  # e.g. \r-only progress bars: do not grow forever
                lines.append(pending)
                pending = b""
            for raw in lines:
                self._emit(raw, is_stdout)
        if pending:  # a last line without a newline
            self._emit(pending, is_stdout)

    def _emit(self, raw: bytes, is_stdout: bool) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if self._pid is None:
            match = _PID_LINE.match(line) if is_stdout else None
            if match:
                self._pid = int(match.group(1))
                self._pid_seen.set()
                return
            self._early_lines.append(line)
        with self._emit_lock:
            try:
                self.on_line(self.rank, self.host.host, line)
            except Exception:  # a broken callback must not stop the draining of output
                log.exception("on_line callback failed for rank %d", self.rank)

    def poll(self) -> int | None:
        """The exit code if the rank ended or the connection is gone, else None."""
        if self._returncode is not None:
            return self._returncode
        chan = self._channel
        if chan is None:
            return None
        transport = chan.get_transport()
        alive = transport is not None and transport.is_active()
        # exit_status_ready() is true on exit-status, and when the channel closed: then
        # exit_status stays -1 (paramiko ignores exit-signal, and a dead transport sends nothing).
        if alive and not chan.exit_status_ready():
            return None
        status = chan.exit_status
        if status >= 0:
            self._returncode = status
        elif alive and self._last_signal is not None:
            self._returncode = -self._last_signal
        else:
            self._returncode = CONNECTION_LOST
        return self._returncode

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Wait for the rank to end; returns its exit code, or None on timeout."""
        chan = self._channel
        if chan is None:
            return self._returncode
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (code := self.poll()) is None:
            remaining = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if remaining <= 0:
                return None
            chan.status_event.wait(remaining)
        for reader in self._readers:  # let the last lines through before reporting the end
            reader.join(timeout=1.0)
        return code

    def signal(self, sig: int) -> None:
        """Send sig to the remote rank; a no-op once it has ended."""
        if self._pid is None or self._client is None or self.poll() is not None:
            return
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            return  # closed: poll() reports the lost connection
        self._last_signal = sig
        command = _kill_command(self._pid, sig)
        try:
            rc, out = _run_command(transport, command)
        except (paramiko.SSHException, OSError) as e:
            log.warning("rank %d on %s: `%s` failed: %s", self.rank, self.host.host, command, e)
            return
        if rc != 0 and "no such process" not in out.lower():
            log.warning("rank %d on %s: `%s` failed with status %d: %s", self.rank, self.host.host, command, rc, out)

    def kill(self) -> None:
        """SIGKILL the remote rank, wait briefly for it to be reported dead, and disconnect."""
        self.signal(signal_module.SIGKILL)
        self.wait(timeout_s=5.0)
        self.close()

    def close(self) -> None:
        """Disconnect. A rank still running sees stdin EOF and, if it watches stdin, exits."""
        self.poll()  # remember an exit status that already arrived
        if self._channel is not None:
            self._channel.close()
        if self._client is not None:
            self._client.close()
        for reader in self._readers:
            if reader is not threading.current_thread():
                reader.join(timeout=1.0)
