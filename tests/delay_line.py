"""A userspace delay line: every Ethernet frame that arrives on one interface leaves the other
`delay` seconds later, both ways. Stands in for `tc qdisc ... netem delay` on kernels built
without netem (see tests/slow_link.py for where it sits and docs/benchmarks.md for its limits).

    python tests/delay_line.py IFACE_A IFACE_B DELAY_MS

Run it inside the namespace that holds both interfaces (they carry no addresses there, so that
namespace's own stack ignores the frames). Frames are read and written with AF_PACKET sockets
with PACKET_VNET_HDR, so TCP segmentation (GSO) and checksum offload pass through unchanged: a
64 KB GSO frame is one read and one write, and the kernel finishes its checksum on the far side.

One thread, one loop: wait (select) for a frame or for the head of a queue to fall due, read
what arrived, stamp it, send what is due. The delay is constant, so each direction is a FIFO.
The timer slack is set to 1 ns so the waits end when asked, and the process asks for real-time
(SCHED_FIFO) priority so other work on a loaded machine does not delay its wake-ups; without it
(not root) a late wake-up can only add delay, never remove it.
"""

from __future__ import annotations

import collections
import ctypes
import os
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4  # a frame this socket's interface sent (our own writes): not to forward
PR_SET_TIMERSLACK = 29
MAX_FRAME = 65536 + 64  # a GSO frame plus the 10-byte virtio_net_hdr


def open_port(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.bind((iface, 0))
    s.setblocking(False)
    return s


def run(a: socket.socket, b: socket.socket, delay_s: float) -> None:
    other = {a: b, b: a}
    queues: dict[socket.socket, collections.deque] = {a: collections.deque(), b: collections.deque()}
    while True:
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - time.monotonic()) if heads else None
        readable, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for s in readable:
            while True:  # drain: one wake-up may find many frames
                try:
                    frame, addr = s.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if addr[2] != PACKET_OUTGOING:
                    queues[s].append((now + delay_s, frame))
        now = time.monotonic()
        for s, q in queues.items():
            while q and q[0][0] <= now:
                try:
                    other[s].send(q.popleft()[1])
                except OSError:
                    pass  # a full queue on the far side drops the frame, as a real link would


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    iface_a, iface_b, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except OSError:
        pass
    try:
        # A link's delay does not depend on the load of the hosts: real-time priority keeps other
        # processes on a busy machine from making the line late. It sleeps in select() between
        # frames, so it takes no more CPU than the frames need.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        pass  # not root: ordinary priority, and a late wake-up adds delay
    a, b = open_port(iface_a), open_port(iface_b)
    print("ready", flush=True)  # the sockets are bound: nothing sent from now on is lost
    run(a, b, delay_ms / 1e3)


if __name__ == "__main__":
    main()
