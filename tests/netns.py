"""Two throwaway SSH hosts in Linux network namespaces, for testing the SSH launcher.

The `ssh_hosts` fixture builds, per test module:

    root namespace:  bridge mlxc-br0 10.213.0.1/24
                       |-- veth mlxcv<pid>a <-> eth0 in netns mlxc-<pid>-a  10.213.0.11/24  sshd :22
                       `-- veth mlxcv<pid>b <-> eth0 in netns mlxc-<pid>-b  10.213.0.12/24  sshd :22

Each sshd is OpenSSH's, with a fresh ed25519 host key, accepting only a fresh client key
(for root, the user the tests run as). The filesystem is shared with the namespaces, so a
"remote" process runs the same Python and sees the same installed package; only the
network (and so the SSH path to it) differs. A known_hosts file lists both host keys so
the launcher can be tested with strict host-key checking.

Everything is removed at the end, and leftovers of an earlier crashed run (same name
prefix) are removed at the start. A lock file serialises concurrent runs, which would
otherwise fight over the bridge and the fixed addresses.

The fixture skips, with the reason, when this cannot work here: not Linux, not root, no
`ip netns`, namespace creation refused, or no sshd (after trying .ci/install-system-deps.sh).
Use `needs_netns` as a mark so such tests skip without even trying.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlx_cluster.config import HostSection, SshSection

BRIDGE = "mlxc-br0"
BRIDGE_CIDR = "10.213.0.1/24"
HOST_IPS = ("10.213.0.11", "10.213.0.12")
SUFFIXES = ("a", "b")
NS_PATTERN = re.compile(r"^mlxc-\d+-[abm]$")  # m: tests/slow_link.py's middle
VETH_PATTERN = re.compile(r"^mlxcv\d+[ab]$")
LOCK_PATH = "/run/mlxc-netns.lock"
TMP_PREFIX = "mlxc-netns-"
INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "install-system-deps.sh"
SSHD_SEARCH_PATH = "/usr/sbin:/usr/local/sbin:/sbin:/usr/bin"


def _run(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (cheap checks only), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed; run .ci/install-system-deps.sh"
    try:
        _run("ip", "netns", "list", timeout=5)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns` does not work here: {e}"
    return None


_UNAVAILABLE = netns_unavailable_reason()
needs_netns = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


@dataclass
class SshHosts:
    """What a test gets: two reachable SSH hosts and the files to log in to them."""

    namespaces: list[str]
    ips: list[str]
    key_file: Path  # client private key, authorised on both hosts
    known_hosts: Path  # both host keys, by IP
    tmp: Path
    host_public_keys: list[str] = field(default_factory=list)  # "ssh-ed25519 AAAA..." per host

    def host(self, index: int, ranks: int = 1) -> HostSection:
        return HostSection(host=self.ips[index], ranks=ranks, ips=[self.ips[index]])

    def ssh_section(self, **overrides) -> SshSection:
        values = {
            "user": getpass.getuser(),
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
            "strict_host_keys": True,
            "connect_timeout_s": 5.0,
        }
        values.update(overrides)
        return SshSection(**values)

    def run_in(self, index: int, *cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        """Run a command inside host `index`'s namespace."""
        return _run("ip", "netns", "exec", self.namespaces[index], *cmd, check=check, timeout=timeout)

    def pids(self, index: int) -> set[int]:
        """Pids of all processes in host `index`'s namespace."""
        return {int(p) for p in _run("ip", "netns", "pids", self.namespaces[index]).stdout.split()}

    @staticmethod
    def namespace_of(pid: int) -> str:
        """The name of the namespace pid lives in ("" for the root namespace)."""
        return _run("ip", "netns", "identify", str(pid), check=False).stdout.strip()


# ---------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _exclusive_lock(timeout_s: float = 120) -> Iterator[None]:
    """One fixture at a time per machine; the kernel drops the lock if we crash."""
    with open(LOCK_PATH, "w") as lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another test run holds {LOCK_PATH} for more than {timeout_s:.0f} s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kill_namespace_processes(ns: str) -> None:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _links() -> list[str]:
    return [link["ifname"] for link in json.loads(_run("ip", "-j", "link", "show").stdout or "[]")]


def remove_leftovers() -> None:
    """Delete every namespace (and its processes), veth, bridge and temp dir with our names.

    Call with the lock held: then none of them can belong to a run still going on.
    """
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if NS_PATTERN.match(ns):
            _kill_namespace_processes(ns)
            _run("ip", "netns", "del", ns, check=False)
    for name in _links():
        if VETH_PATTERN.match(name) or name == BRIDGE:
            _run("ip", "link", "del", name, check=False)
    for stale in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _find_sshd() -> str | None:
    sshd = shutil.which("sshd", path=SSHD_SEARCH_PATH)
    if sshd is None and INSTALL_SCRIPT.exists():
        # Slow (apt) but only the first time on a fresh machine.
        subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, timeout=600, check=False)
        sshd = shutil.which("sshd", path=SSHD_SEARCH_PATH)
    return sshd


def _create_network(hosts: SshHosts) -> None:
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", BRIDGE_CIDR, "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    for ns, ip, suffix in zip(hosts.namespaces, hosts.ips, SUFFIXES, strict=True):
        veth = f"mlxcv{os.getpid()}{suffix}"
        _run("ip", "netns", "add", ns)
        # Create the pair with its far end already inside the namespace, named eth0 there.
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")


def _write_keys(hosts: SshHosts) -> None:
    def keygen(path: Path, comment: str) -> str:
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
        return Path(f"{path}.pub").read_text().strip()

    client_pub = keygen(hosts.key_file, "mlxc-test-client")
    (hosts.tmp / "authorized_keys").write_text(client_pub + "\n")
    for suffix in SUFFIXES:
        pub = keygen(hosts.tmp / f"host_{suffix}.key", f"mlxc-test-host-{suffix}")
        # Keep only "type base64": the comment is not part of a known_hosts entry.
        hosts.host_public_keys.append(" ".join(pub.split()[:2]))
    hosts.known_hosts.write_text(
        "".join(f"{ip} {key}\n" for ip, key in zip(hosts.ips, hosts.host_public_keys, strict=True))
    )


def _start_sshd(hosts: SshHosts, index: int, sshd: str) -> subprocess.Popen:
    suffix = SUFFIXES[index]
    config = hosts.tmp / f"sshd_{suffix}.conf"
    config.write_text(
        f"""ListenAddress {hosts.ips[index]}
Port 22
HostKey {hosts.tmp}/host_{suffix}.key
AuthorizedKeysFile {hosts.tmp}/authorized_keys
PidFile {hosts.tmp}/sshd_{suffix}.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
LogLevel VERBOSE
"""
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    with open(hosts.tmp / f"sshd_{suffix}.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            ["ip", "netns", "exec", hosts.namespaces[index], sshd, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for_sshd(hosts: SshHosts, index: int, proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """A TCP connect from the root namespace, across the bridge, to the sshd: proves both."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((hosts.ips[index], 22), timeout=0.5):
                return
        except OSError as e:
            log = (hosts.tmp / f"sshd_{SUFFIXES[index]}.log").read_text(errors="replace")
            if proc.poll() is not None:
                raise RuntimeError(f"sshd in {hosts.namespaces[index]} exited with {proc.returncode}:\n{log}") from e
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd at {hosts.ips[index]}:22 not reachable ({e}); its log:\n{log}") from e
            time.sleep(0.05)


def _check_between_namespaces(hosts: SshHosts) -> None:
    """Host a reaches host b over the bridge, as ranks on two hosts would."""
    probe = f"import socket; socket.create_connection(({hosts.ips[1]!r}, 22), timeout=3).close()"
    hosts.run_in(0, sys.executable, "-c", probe)


def _stop(procs: list[subprocess.Popen], hosts: SshHosts) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for ns in hosts.namespaces:
        _kill_namespace_processes(ns)  # ranks a test left behind
    remove_leftovers()


@contextlib.contextmanager
def netns_ssh_hosts() -> Iterator[SshHosts]:
    """Build the two SSH hosts, yield them, and tear everything down afterwards."""
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    sshd = _find_sshd()
    if sshd is None:
        pytest.skip("OpenSSH's sshd is not installed and .ci/install-system-deps.sh could not install it")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) is not installed")
    with _exclusive_lock():
        remove_leftovers()  # of a crashed run: nobody else can be using them, we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        hosts = SshHosts(
            namespaces=[f"mlxc-{os.getpid()}-{s}" for s in SUFFIXES],
            ips=list(HOST_IPS),
            key_file=tmp / "client.key",
            known_hosts=tmp / "known_hosts",
            tmp=tmp,
        )
        procs: list[subprocess.Popen] = []
        try:
            try:
                _create_network(hosts)
            except subprocess.CalledProcessError as e:
                pytest.skip(f"cannot create network namespaces here: `{' '.join(e.cmd)}`: {e.stderr.strip()}")
            _write_keys(hosts)
            procs = [_start_sshd(hosts, i, sshd) for i in range(len(hosts.ips))]
            for i, proc in enumerate(procs):
                _wait_for_sshd(hosts, i, proc)
            _check_between_namespaces(hosts)
            yield hosts
        finally:
            _stop(procs, hosts)  # also removes tmp, with the other leftovers


@pytest.fixture(scope="module")
def ssh_hosts() -> Iterator[SshHosts]:
    """Two SSH hosts in network namespaces (see the module docstring); skips where impossible."""
    with netns_ssh_hosts() as hosts:
        yield hosts
