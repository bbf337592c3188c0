"""Two SSH "hosts" (tests/netns.py) joined by a slow link: added delay and a rate limit.

    root namespace: bridge 10.213.0.1 --- a: eth0 10.213.0.11    b: eth0 10.213.0.12   (SSH, HTTP)

    a: sl0 10.213.1.11 <-veth-> m: sla ==delay line== slb <-veth-> b: sl0 10.213.1.12

The ranks talk over the 10.213.1.x addresses (their `ips:`): the ring's all_sums, the control
bus and the status link all cross the slow link; SSH and the HTTP API use the bridge.

Why not `tc qdisc ... netem delay`: this kernel is built without netem (and without fq, etf,
cake: only tbf, htb, pfifo and clsact exist), so no qdisc can hold a packet for a fixed time.
The rate is a kernel tbf on each sl0 (egress, both directions); the delay is tests/delay_line.py,
a userspace process in namespace m that forwards every frame between sla and slb `delay_ms`
later (each direction, so a round trip gains 2 x delay_ms). `measure_rtt` times a TCP ping-pong
across the link, so what was actually added is measured, not assumed.

Limits against netem: the delay line adds its own forwarding cost (about 0.05-0.1 ms each way)
and any scheduling delay of its process (it asks for SCHED_FIFO so a loaded machine does not
make it late; a late wake-up only adds delay, never removes it); it has no jitter, loss or
reordering model; frames are held in userspace, so its queue is unbounded (tbf, before it,
bounds the rate).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.cluster import REPO, Cluster, free_port
from tests.netns import SshHosts, _run, netns_ssh_hosts

LINK_IPS = ("10.213.1.11", "10.213.1.12")
DELAY_LINE = Path(__file__).resolve().parent / "delay_line.py"
TBF_BURST = "256kb"  # at least a 64 KB GSO frame, or tbf cuts every TCP burst to the burst size


@dataclass
class SlowLinkHosts:
    hosts: SshHosts  # SSH, namespaces, bridge addresses
    link_ips: list[str]  # each host's address on the slow link (give these as ips:)
    middle: str  # the namespace of the delay line
    delay_ms: float  # added each way
    rate: str | None  # tbf rate on each end, None: no rate limit


def _shape(link: SlowLinkHosts) -> None:
    hosts = link.hosts
    mid = link.middle
    _run("ip", "netns", "add", mid)
    for i, (ns, ip, end) in enumerate(zip(hosts.namespaces, link.link_ips, ("sla", "slb"), strict=True)):
        _run("ip", "link", "add", "sl0", "netns", ns, "type", "veth", "peer", "name", end, "netns", mid)
        hosts.run_in(i, "ip", "addr", "add", f"{ip}/24", "dev", "sl0")
        hosts.run_in(i, "ip", "link", "set", "sl0", "up")
        _run("ip", "-n", mid, "link", "set", end, "up")
        if link.rate:
            hosts.run_in(
                i, "tc", "qdisc", "replace", "dev", "sl0", "root", "tbf", "rate", link.rate,
                "burst", TBF_BURST, "latency", "20ms",
            )  # fmt: skip


def _start_delay_line(link: SlowLinkHosts) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", link.middle, sys.executable, str(DELAY_LINE), "sla", "slb", str(link.delay_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"delay line did not start: {line} {proc.stdout.read()}")
    return proc


@contextlib.contextmanager
def slow_link_hosts(delay_ms: float = 0.3, rate: str | None = "1gbit") -> Iterator[SlowLinkHosts]:
    """Build the hosts and the link, yield them, tear everything down (skips where impossible)."""
    with netns_ssh_hosts() as hosts:
        link = SlowLinkHosts(hosts, list(LINK_IPS), f"mlxc-{os.getpid()}-m", delay_ms, rate)
        delay_line = None
        try:
            _shape(link)
            delay_line = _start_delay_line(link)
            yield link
        finally:
            if delay_line is not None:
                delay_line.terminate()
                delay_line.wait(5)
            _run("ip", "netns", "del", link.middle, check=False)  # takes its veth ends along


def two_host_cluster(workdir: Path, link: SlowLinkHosts, ips: list[str], parallel=None, **config) -> Cluster:
    """A 2-rank cluster, one rank per host, its ranks talking over `ips` (link.link_ips: the slow
    link; link.hosts.ips: the unshaped bridge). `config` is merged into the YAML (e.g. model=...)."""
    hosts = link.hosts
    workdir.mkdir(parents=True, exist_ok=True)
    python = workdir / "python"  # remote ranks run this checkout (SSH does not pass PYTHONPATH)
    python.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    port = free_port()
    section = {"python": str(python), "cwd": str(REPO), "base_port": 5600}
    if parallel is not None:
        section["parallel"] = parallel
    cluster = Cluster(
        workdir,
        config={
            "cluster": section,
            "hosts": [{"host": h, "ips": [ip]} for h, ip in zip(hosts.ips, ips, strict=True)],
            "ssh": hosts.ssh_section().model_dump(),
            # The API listens on the bridge, which only this machine reaches: no key needed.
            "server": {"host": hosts.ips[0], "port": port, "allow_insecure": True},
            **config,
        },
    )
    cluster.url = f"http://{hosts.ips[0]}:{port}"
    return cluster


# ---------------------------------------------------------------------------- measuring

_ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(({ip!r}, {port})); s.listen()
print("listening", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(1 << 20):
    c.sendall(data)
"""

_PING = """
import socket, time, json, threading
c = socket.create_connection(({ip!r}, {port})); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range({count}):
    t = time.perf_counter(); c.sendall(b"x" * 64); n = 0
    while n < 64: n += len(c.recv(64))
    rtts.append(time.perf_counter() - t)
big = b"y" * (4 << 20); t = time.perf_counter(); n = 0
sender = threading.Thread(target=c.sendall, args=(big,)); sender.start()  # reading meanwhile: no deadlock
while n < len(big): n += len(c.recv(1 << 20))
sender.join()
print(json.dumps({{"rtts": rtts, "echo_4mb_s": time.perf_counter() - t}}))
"""


def measure_rtt(hosts: SshHosts, ips: list[str], count: int = 200, port: int = 7391) -> dict:
    """A TCP ping-pong (64 B, TCP_NODELAY) from host b to host a at `ips`, and a 4 MB echo."""
    import json

    server = subprocess.Popen(
        ["ip", "netns", "exec", hosts.namespaces[0], sys.executable, "-c", _ECHO.format(ip=ips[0], port=port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server.stdout.readline()
        out = hosts.run_in(1, sys.executable, "-c", _PING.format(ip=ips[0], port=port, count=count), timeout=60)
    finally:
        server.kill()
        server.wait()
    result = json.loads(out.stdout)
    rtts = sorted(r * 1e3 for r in result["rtts"])
    return {
        "rtt_p50_ms": round(statistics.median(rtts), 3),
        "rtt_p10_ms": round(rtts[len(rtts) // 10], 3),
        "rtt_p90_ms": round(rtts[len(rtts) * 9 // 10], 3),
        # Both directions at once (an echo), as a 2-rank ring all_sum moves data.
        "echo_4mb_ms": round(result["echo_4mb_s"] * 1e3, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
