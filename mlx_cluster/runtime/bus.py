"""The control bus: rank 0 publishes each step's plan to every rank.

Plans travel over one authenticated TCP connection per worker (the plan link), never through
a device collective. A collective would have to be evaluated before the step it describes,
and evaluating anything on the model's stream waits for the step already queued there: the
device would idle while Python builds the next graph, every step (measured on 2xH200: a TP=2
stream 2.7x slower than one GPU). Over TCP, publishing costs a few microseconds of host time
and the device never waits for the bus: `BusStats.device_syncs` stays at zero.

Lock-step needs no per-step handshake: every model step of a tensor-parallel group runs
all_sums that every rank must join, so rank 0 can run at most one step ahead of a worker,
and a stopped peer stalls those all_sums (the watchdog catches it). When nothing runs there
are no all_sums, so idle plans (sent at least once per heartbeat) are acknowledged by each
worker: a stopped worker is noticed while idle too. An idle worker blocks in `recv` on its
socket, which costs no CPU (a rank blocked in a ring collective spins a core), and a closed
socket tells a worker at once that rank 0 is gone.

The one exchange that needs every rank's input, agreeing on how many prefix-cache blocks each
rank can restore, is a gather to rank 0 and a broadcast back over the same links.

Frames: magic, kind, payload length, crc32, payload. The payload of a plan is the bounded
codec of engine/plan.py: nothing read off the network is trusted, pickled or evaluated.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

from mlx_cluster.engine.plan import StepPlan, decode_plan, encode_plan

log = logging.getLogger(__name__)

MAGIC = b"MXCB"
_HEADER = struct.Struct("<4sBII")  # magic, kind, payload length, crc32
MAX_PAYLOAD_BYTES = 64 << 20

KIND_PLAN = 1  # rank 0 -> worker: an encoded StepPlan
KIND_ACK = 2  # worker -> rank 0: an idle plan arrived (liveness while nothing runs)
KIND_COUNTS = 3  # worker -> rank 0: per-sequence counts to agree on (int32 array)
KIND_AGREED = 4  # rank 0 -> worker: the agreed per-sequence minimum (int32 array)


class BusError(RuntimeError):
    """The bus cannot go on: a peer vanished, a frame is corrupt, or rank 0 went silent."""


@dataclass
class BusStats:
    """Counters a rank reports about its bus traffic (plain data; metrics maps them)."""

    plans: int = 0
    messages: int = 0  # frames this rank sent or received on the plan link
    bytes: int = 0
    device_syncs: int = 0  # bus operations that waited on the device: zero by design, kept visible
    agreements: int = 0  # gather/broadcast rounds (prefix-cache restores)


class PlanLink:
    """TCP links between rank 0 and every worker, authenticated by a per-run token."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, token: str, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.host, self.port = host, port
        self.token = token.encode()
        self.timeout_s = timeout_s
        self.peers: dict[int, socket.socket] = {}  # rank 0: worker rank -> its connection
        self.sock: socket.socket | None = None  # a worker: its connection to rank 0
        self.stats = BusStats()

    def connect(self) -> None:
        """Rank 0 accepts one authenticated connection per worker; workers dial rank 0."""
        if self.world_size == 1:
            return
        if self.rank == 0:
            self._accept_all()
        else:
            self._dial()

    def _accept_all(self) -> None:
        server = socket.create_server((self.host, self.port), reuse_port=False)
        server.settimeout(1.0)
        deadline = time.monotonic() + self.timeout_s
        try:
            while len(self.peers) < self.world_size - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.world_size)) - set(self.peers))
                    raise BusError(f"ranks {missing} did not connect to the plan link on port {self.port}")
                try:
                    conn, addr = server.accept()
                except TimeoutError:
                    continue
                rank = self._handshake(conn)
                if rank is None or rank in self.peers:
                    # A stranger or a duplicate: drop it without a word.
                    log.warning("plan link: rejected a connection from %s", addr[0])
                    conn.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.peers[rank] = conn
        finally:
            server.close()

    def _handshake(self, conn: socket.socket) -> int | None:
        conn.settimeout(2.0)
        try:
            hello = _recv_exactly(conn, 4 + len(self.token))
        except (OSError, BusError):
            return None
        (rank,) = struct.unpack("<I", hello[:4])
        if not hmac.compare_digest(hello[4:], self.token) or not 0 < rank < self.world_size:
            return None
        conn.settimeout(None)
        return rank

    def _dial(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise BusError(f"cannot reach rank 0's plan link at {self.host}:{self.port}: {e}") from e
                time.sleep(0.1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("<I", self.rank) + self.token)
        self.sock = sock

    # ---- frames ------------------------------------------------------------------------
    def send(self, kind: int, payload: bytes, to: int | None = None) -> None:
        """Rank 0: to every worker (or worker `to`); a worker: to rank 0."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise BusError(f"a bus frame of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")
        frame = _HEADER.pack(MAGIC, kind, len(payload), zlib.crc32(payload)) + payload
        targets = [self.sock] if self.rank else [self.peers[to]] if to is not None else list(self.peers.values())
        for sock in targets:
            try:
                sock.sendall(frame)
            except OSError as e:
                raise BusError(f"a peer's plan link is closed ({e}): the peer is gone") from e
            self.stats.messages += 1
            self.stats.bytes += len(frame)

    def recv(self, kind: int, timeout_s: float, peer: int = 0) -> bytes:
        """The next frame from rank 0 (a worker) or from worker `peer` (rank 0), which must be `kind`."""
        sock = self.sock if self.rank else self.peers[peer]
        sock.settimeout(timeout_s)
        try:
            header = _recv_exactly(sock, _HEADER.size)
            magic, got, length, crc = _HEADER.unpack(header)
            if magic != MAGIC or length > MAX_PAYLOAD_BYTES:
                raise BusError("corrupt bus frame header: ranks are out of step")
            payload = _recv_exactly(sock, length)
        except TimeoutError:
            who = "rank 0" if self.rank else f"rank {peer}"
            raise BusError(f"{who} sent nothing on the plan link for {timeout_s:.0f} s") from None
        except OSError as e:
            raise BusError(f"lost the plan link: {e}") from e
        if zlib.crc32(payload) != crc:
            raise BusError("bus frame failed its checksum: ranks are out of step")
        if got != kind:
            raise BusError(f"expected a bus frame of kind {kind}, got {got}: ranks are out of step")
        self.stats.messages += 1
        self.stats.bytes += _HEADER.size + length
        return payload

    def close(self) -> None:
        for s in [*self.peers.values(), self.sock]:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise BusError("the peer closed the plan link: it is gone")
        got += k
    return bytes(buf)


class ControlBus:
    """Publishes `StepPlan`s from rank 0 and receives them everywhere else."""

    def __init__(self, link: PlanLink, silence_timeout_s: float):
        self.link = link
        self.rank = link.rank
        self.world_size = link.world_size
        self.silence_timeout_s = silence_timeout_s
        self.stats = link.stats

    def exchange(self, plan: StepPlan | None) -> StepPlan:
        """Rank 0 passes its plan and gets it back; workers pass None and get rank 0's plan."""
        self.stats.plans += 1
        if self.rank == 0:
            payload = encode_plan(plan)
            # Rank 0 too runs the plan decoded from the bytes on the wire, never its in-memory
            # object: the codec rounds floats to float32, and a plan that differs by a rounding
            # (repetition_penalty=5e-324 is "on" in memory and 0.0, "off", on the wire) made the
            # ranks sample different tokens. The same holds on one rank, so TP=1 matches TP=N.
            out = decode_plan(payload)
            if self.world_size > 1:
                self.link.send(KIND_PLAN, payload)
                if out.idle:
                    # Nothing runs, so no all_sum would stall on a stopped worker: ask each to answer.
                    for peer in self.link.peers:
                        self.link.recv(KIND_ACK, self.silence_timeout_s, peer)
            return out
        out = decode_plan(self.link.recv(KIND_PLAN, self.silence_timeout_s))
        if out.idle:
            self.link.send(KIND_ACK, b"")
        return out

    def agree_min(self, counts: list[int]) -> list[int]:
        """The element-wise minimum of every rank's `counts` (same length everywhere), on every rank."""
        if self.world_size == 1:
            return list(counts)
        self.stats.agreements += 1
        mine = np.asarray(counts, dtype=np.int32)
        if self.rank == 0:
            agreed = mine
            for peer in self.link.peers:
                theirs = np.frombuffer(self.link.recv(KIND_COUNTS, self.silence_timeout_s, peer), dtype=np.int32)
                if theirs.shape != mine.shape:
                    raise BusError(f"rank {peer} agreed on {theirs.size} counts, rank 0 on {mine.size}")
                agreed = np.minimum(agreed, theirs)
            self.link.send(KIND_AGREED, agreed.tobytes())
        else:
            self.link.send(KIND_COUNTS, mine.tobytes())
            agreed = np.frombuffer(self.link.recv(KIND_AGREED, self.silence_timeout_s), dtype=np.int32)
            if agreed.shape != mine.shape:
                raise BusError(f"rank 0 agreed on {agreed.size} counts, this rank asked for {mine.size}")
        return agreed.tolist()
