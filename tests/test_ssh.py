"""The SSH launcher against real OpenSSH servers in network namespaces (see netns.py).

The "remote" hosts share this machine's filesystem, so sys.executable and the installed
mlx_cluster package work there; what is real is the SSH path: host-key checks, auth,
the boot protocol on stdin, remote pids, signals and connection loss.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mlx_cluster.config import HostSection
from mlx_cluster.launcher.ssh import RemoteLaunchError, RemoteRankProcess, kill_remote
from tests import netns
from tests.netns import SshHosts, needs_netns

pytestmark = [needs_netns, pytest.mark.timeout(60)]
ssh_hosts = netns.ssh_hosts  # the fixture, under its own name so pytest finds it here

SECRET = "sk-mlxc-test-7f3a9c"


class Lines:
    """Collects on_line calls; waits for a line to show up."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, rank: int, host: str, line: str) -> None:
        with self._cond:
            self.calls.append((rank, host, line))
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        return [line for _, _, line in self.calls]

    def wait_for(self, line: str, timeout_s: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: line in self.lines, timeout=timeout_s):
                raise AssertionError(f"{line!r} never arrived; got {self.lines}")


def start(hosts: SshHosts, index: int, code: str, env=None, cwd=None, ssh=None) -> tuple[RemoteRankProcess, Lines]:
    lines = Lines()
    proc = RemoteRankProcess(
        rank=index,
        host=hosts.host(index),
        ssh=ssh or hosts.ssh_section(),
        argv=[sys.executable, "-c", textwrap.dedent(code)],
        env=env or {},
        cwd=cwd,
        on_line=lines,
    )
    proc.start()
    return proc, lines


def running(pid: int) -> bool:
    """Whether pid exists and is not a zombie.

    A rank whose sshd went away is re-parented to pid 1, which may take its time to reap
    it; a zombie has exited, which is what the tests care about.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout_s: float) -> float:
    """Seconds until pid has exited; fails after timeout_s."""
    t0 = time.monotonic()
    while running(pid):
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"remote pid {pid} still running after {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


SLEEPER = """
    from mlx_cluster.launcher.remote_boot import watch_stdin_and_exit
    import signal, sys, time
    watch_stdin_and_exit()
    signal.signal(signal.SIGUSR1, lambda *_: (print("got usr1", flush=True), sys.exit(3)))
    print("ready", flush=True)
    time.sleep(60)
"""


def test_runs_program_in_namespace_with_env_cwd_output_and_exit_code(ssh_hosts: SshHosts, tmp_path):
    go = tmp_path / "go"
    proc, out = start(
        ssh_hosts,
        0,
        f"""
        import os, sys, time
        print("secret=" + os.environ["MLXC_SECRET"])
        print("cwd=" + os.getcwd())
        print("watch=" + os.environ.get("MLX_CLUSTER_WATCH_STDIN", ""))
        sys.stderr.write("to stderr\\n")
        sys.stdout.buffer.write(b"bad \\xff byte\\n")
        print("ready", flush=True)
        deadline = time.time() + 20
        while not os.path.exists({str(go)!r}) and time.time() < deadline:
            time.sleep(0.02)
        sys.stdout.write("no newline at the end")
        sys.exit(7)
        """,
        env={"MLXC_SECRET": SECRET},
        cwd=str(tmp_path),
    )
    try:
        out.wait_for("ready")
        pid = proc.pid
        assert pid is not None and proc.poll() is None
        # The pid is the program's own, and it runs inside namespace a, not here.
        assert ssh_hosts.namespace_of(pid) == ssh_hosts.namespaces[0]
        assert pid in ssh_hosts.pids(0)
        assert "-c" in cmdline(pid)
        # The secret reached the program but no command line in the namespace (sshd, the
        # login shell that ran remote_boot, the program) ever shows it.
        for p in ssh_hosts.pids(0):
            assert SECRET not in cmdline(p), f"secret on the command line of pid {p}: {cmdline(p)}"
        go.touch()
        assert proc.wait(10) == 7
    finally:
        proc.close()
    # stdout and stderr are separate streams: only lines within one keep their order.
    assert "to stderr" in out.lines
    assert [line for line in out.lines if line != "to stderr"] == [
        f"secret={SECRET}",
        f"cwd={tmp_path}",
        "watch=1",
        "bad \ufffd byte",
        "ready",
        "no newline at the end",
    ]
    assert {(rank, host) for rank, host, _ in out.calls} == {(0, ssh_hosts.ips[0])}
    assert not any(line.startswith("MLXC-PID") for line in out.lines)
    assert proc.poll() == 7


def test_boot_failures_are_reported_with_the_remote_output(ssh_hosts: SshHosts, tmp_path):
    with pytest.raises(RemoteLaunchError, match=r"cannot change to working directory .*missing"):
        start(ssh_hosts, 0, "print('never')", cwd=str(tmp_path / "missing"))
    bad_python = RemoteRankProcess(
        0, ssh_hosts.host(0), ssh_hosts.ssh_section(), ["/nonexistent/python3"], {}, None, Lines()
    )
    with pytest.raises(RemoteLaunchError, match=r"exited with status 127 before starting the rank"):
        bad_python.start()


def test_signal_and_kill_stop_the_remote_process(ssh_hosts: SshHosts):
    proc, out = start(ssh_hosts, 1, SLEEPER)
    out.wait_for("ready")
    proc.signal(signal.SIGUSR1)  # sent by name, handled by the program
    assert proc.wait(5) == 3
    assert "got usr1" in out.lines
    wait_gone(proc.pid, 2)
    proc.close()

    proc, out = start(ssh_hosts, 1, SLEEPER)
    out.wait_for("ready")
    proc.signal(signal.SIGTERM)
    assert proc.wait(5) == -signal.SIGTERM
    wait_gone(proc.pid, 2)
    proc.close()

    proc, out = start(ssh_hosts, 1, SLEEPER)
    out.wait_for("ready")
    pid = proc.pid
    proc.kill()
    assert proc.poll() == -signal.SIGKILL
    wait_gone(pid, 2)
    proc.signal(signal.SIGTERM)  # after the end: a no-op, not an error


def test_remote_rank_exits_when_the_launcher_connection_closes(ssh_hosts: SshHosts):
    proc, out = start(ssh_hosts, 0, SLEEPER)
    out.wait_for("ready")
    proc._client.close()  # as if the launcher vanished: no signal, the connection just ends
    assert wait_gone(proc.pid, 2) < 2
    assert proc.poll() == 255


def test_remote_rank_exits_when_the_launcher_process_is_killed(ssh_hosts: SshHosts):
    launcher = textwrap.dedent(
        f"""
        import sys, time
        from mlx_cluster.config import SshSection, HostSection
        from mlx_cluster.launcher.ssh import RemoteRankProcess
        ssh = SshSection.model_validate_json({ssh_hosts.ssh_section().model_dump_json()!r})
        proc = RemoteRankProcess(0, HostSection(host={ssh_hosts.ips[0]!r}), ssh,
                                 [sys.executable, "-c", {textwrap.dedent(SLEEPER)!r}], {{}}, None,
                                 lambda r, h, line: print(line, flush=True))
        proc.start()
        print("pid", proc.pid, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        pid = None
        for line in child.stdout:
            if line.startswith("pid "):
                pid = int(line.split()[1])
            if line.strip() == "ready":
                break
        assert pid is not None and ssh_hosts.namespace_of(pid) == ssh_hosts.namespaces[0]
        child.kill()  # SIGKILL: no cleanup code runs in the launcher
        assert wait_gone(pid, 2) < 2
    finally:
        child.kill()
        child.wait()


def test_lost_connection_reads_as_exit_255(ssh_hosts: SshHosts):
    proc, out = start(ssh_hosts, 1, SLEEPER)
    out.wait_for("ready")
    before = proc.pid
    # Kill the sshd process serving our connection ("sshd: root@notty"), not the listener.
    sessions = [p for p in ssh_hosts.pids(1) if cmdline(p).startswith("sshd: ") and "@" in cmdline(p)]
    assert sessions
    for p in sessions:
        os.kill(p, signal.SIGKILL)
    assert proc.wait(5) == 255
    wait_gone(before, 2)  # and the rank saw stdin EOF
    proc.close()


def test_unknown_host_key_is_refused_with_instructions(ssh_hosts: SshHosts, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"{ssh_hosts.ips[1]} {ssh_hosts.host_public_keys[1]}\n")  # host b only
    marker = tmp_path / "started"
    ssh = ssh_hosts.ssh_section(known_hosts=str(known))
    with pytest.raises(RemoteLaunchError) as err:
        start(ssh_hosts, 0, f"open({str(marker)!r}, 'w')", ssh=ssh)
    message = str(err.value)
    ip = ssh_hosts.ips[0]
    assert f"host key of {ip} is not in {known}" in message
    assert f"ssh-keyscan -H {ip} >> {known}" in message
    assert "strict_host_keys: false" in message
    assert "SHA256:" in message  # the fingerprint, to verify against the host
    assert not marker.exists()
    assert not any("remote_boot" in cmdline(p) for p in ssh_hosts.pids(0))


def test_missing_known_hosts_file_is_empty_not_an_error(ssh_hosts: SshHosts, tmp_path):
    ssh = ssh_hosts.ssh_section(known_hosts=str(tmp_path / "nope"))
    with pytest.raises(RemoteLaunchError, match="is not in"):
        start(ssh_hosts, 0, "pass", ssh=ssh)


def test_changed_host_key_is_refused(ssh_hosts: SshHosts, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"{ssh_hosts.ips[0]} {ssh_hosts.host_public_keys[1]}\n")  # b's key under a's address
    with pytest.raises(RemoteLaunchError, match=rf"host key of {ssh_hosts.ips[0]} has CHANGED"):
        start(ssh_hosts, 0, "pass", ssh=ssh_hosts.ssh_section(known_hosts=str(known)))


def test_non_strict_accepts_unknown_keys_without_writing_known_hosts(ssh_hosts: SshHosts, tmp_path, caplog):
    known = tmp_path / "known_hosts"
    known.write_text("")
    ssh = ssh_hosts.ssh_section(known_hosts=str(known), strict_host_keys=False)
    with caplog.at_level(logging.WARNING, logger="mlx_cluster.launcher.ssh"):
        proc, out = start(ssh_hosts, 0, "print('ok')", ssh=ssh)
        assert proc.wait(10) == 0
        proc.close()
    assert out.lines == ["ok"]
    assert "accepting unverified host key of 10.213.0.11" in caplog.text
    assert known.read_text() == ""


def test_bad_client_key_fails_authentication(ssh_hosts: SshHosts, tmp_path):
    other = tmp_path / "other.key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(RemoteLaunchError, match="authentication failed with key"):
        start(ssh_hosts, 0, "pass", ssh=ssh_hosts.ssh_section(key_file=str(other)))


def test_kill_remote(ssh_hosts: SshHosts):
    host, ssh = ssh_hosts.host(1), ssh_hosts.ssh_section()
    proc, out = start(ssh_hosts, 1, SLEEPER)
    try:
        out.wait_for("ready")
        pid = proc.pid
        # A recycled pid guard: the command line must contain `match`.
        assert kill_remote(host, ssh, pid, signal.SIGTERM, match="something-else") is False
        assert kill_remote(host, ssh, pid, 0) is True  # signal 0: exists?
        assert proc.poll() is None
        assert kill_remote(host, ssh, pid, signal.SIGTERM, match="watch_stdin_and_exit") is True
        wait_gone(pid, 2)
        assert kill_remote(host, ssh, pid, signal.SIGTERM) is False
        with pytest.raises(ValueError):
            kill_remote(host, ssh, -1, signal.SIGKILL)
    finally:
        proc.close()


def test_unreachable_port_says_so(ssh_hosts: SshHosts):
    bridge = RemoteRankProcess(
        0, HostSection(host="10.213.0.1"), ssh_hosts.ssh_section(), ["python3"], {}, None, Lines()
    )
    with pytest.raises(RemoteLaunchError, match=r"cannot connect to .*@10.213.0.1:22: Connection refused"):
        bridge.start()
