"""The control bus: rank 0 publishes each step's plan to every rank.

Plans travel through mx.distributed collectives: one `all_sum` of a fixed 256-byte frame
(rank 0 writes the bytes, the others add zeros), plus a second one only when the plan does
not fit inline (new prompts). A steady decode step therefore costs exactly one collective.

Idle is different: a rank blocked inside a ring or JACCL collective spins a core (measured:
~100% CPU while waiting), so an idle worker must not sit in one. After an idle plan the
workers block on a plain TCP "doorbell" socket instead; rank 0 rings it right before the next
collective. The doorbell carries no data, only "a plan follows", and a closed doorbell tells
a worker at once that rank 0 is gone.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import mlx.core as mx

from mlx_cluster.engine.plan import StepPlan, decode_plan, encode_plan

log = logging.getLogger(__name__)

MAGIC = b"MXCB"
FRAME_BYTES = 256
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
INLINE_BYTES = FRAME_BYTES - _HEADER.size
MAX_PAYLOAD_BYTES = 64 << 20
RING = b"\x01"


class BusError(RuntimeError):
    """The bus cannot go on: a peer vanished, a frame is corrupt, or rank 0 went silent."""


@dataclass
class BusStats:
    """Counters a rank reports about its bus traffic (plain data; metrics maps them)."""

    plans: int = 0
    collectives: int = 0
    bytes: int = 0
    doorbells: int = 0


def _all_sum_bytes(data: bytes, size: int, group, stream) -> bytes:
    """Broadcast `data` from rank 0: every other rank contributes zeros, so the sum is the data."""
    buf = bytearray(size)
    buf[: len(data)] = data
    x = mx.array(memoryview(buf), dtype=mx.uint8) if data else mx.zeros((size,), dtype=mx.uint8)
    y = mx.distributed.all_sum(x, group=group, stream=stream)
    mx.eval(y)
    return bytes(memoryview(y))


class Doorbell:
    """TCP wake-up line from rank 0 to every worker, authenticated by a per-run token."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, token: str, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.host, self.port = host, port
        self.token = token.encode()
        self.timeout_s = timeout_s
        self.peers: list[socket.socket] = []
        self.sock: socket.socket | None = None

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
        seen: set[int] = set()
        try:
            while len(seen) < self.world_size - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.world_size)) - seen)
                    raise BusError(f"ranks {missing} did not connect to the doorbell on port {self.port}")
                try:
                    conn, addr = server.accept()
                except TimeoutError:
                    continue
                rank = self._handshake(conn)
                if rank is None or rank in seen:
                    # A stranger or a duplicate: drop it without a word.
                    log.warning("doorbell: rejected a connection from %s", addr[0])
                    conn.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                seen.add(rank)
                self.peers.append(conn)
        finally:
            server.close()

    def _handshake(self, conn: socket.socket) -> int | None:
        conn.settimeout(2.0)
        try:
            hello = b""
            while len(hello) < 4 + len(self.token):
                chunk = conn.recv(4 + len(self.token) - len(hello))
                if not chunk:
                    return None
                hello += chunk
        except OSError:
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
                    raise BusError(f"cannot reach rank 0's doorbell at {self.host}:{self.port}: {e}") from e
                time.sleep(0.1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("<I", self.rank) + self.token)
        self.sock = sock

    def ring(self) -> None:
        for peer in self.peers:
            try:
                peer.sendall(RING)
            except OSError as e:
                raise BusError(f"a worker's doorbell is closed ({e}): the worker is gone") from e

    def wait(self, timeout_s: float) -> None:
        """Block until rank 0 rings; raise if it does not within `timeout_s` or hangs up."""
        assert self.sock is not None
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            raise BusError(f"rank 0 sent no heartbeat for {timeout_s:.0f} s") from None
        except OSError as e:
            raise BusError(f"lost rank 0's doorbell: {e}") from e
        if data != RING:
            raise BusError("rank 0 closed the doorbell: it is gone")

    def close(self) -> None:
        for s in [*self.peers, self.sock]:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


class ControlBus:
    """Publishes `StepPlan`s from rank 0 and receives them everywhere else."""

    def __init__(self, group, doorbell: Doorbell, heartbeat_s: float, silence_timeout_s: float):
        self.group = group
        self.rank = group.rank()
        self.world_size = group.size()
        self.doorbell = doorbell
        self.heartbeat_s = heartbeat_s
        self.silence_timeout_s = silence_timeout_s
        self.stream = None  # set by the engine thread: MLX streams belong to the thread that made them
        self.stats = BusStats()
        self._after_idle = False
        self._lock = threading.Lock()

    def exchange(self, plan: StepPlan | None) -> StepPlan:
        """Rank 0 passes its plan and gets it back; workers pass None and get rank 0's plan."""
        self.stats.plans += 1
        if self.world_size == 1:
            assert plan is not None
            return plan
        if self._after_idle:
            if self.rank == 0:
                self.doorbell.ring()
            else:
                self.doorbell.wait(self.silence_timeout_s)
            self.stats.doorbells += 1
        payload = encode_plan(plan) if self.rank == 0 else b""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise BusError(f"plan of {len(payload)} bytes exceeds the bus limit")
        received = self._broadcast(payload)
        out = decode_plan(received)
        self._after_idle = out.idle
        return out

    def _broadcast(self, payload: bytes) -> bytes:
        header = b""
        if self.rank == 0:
            inline = payload if len(payload) <= INLINE_BYTES else b""
            header = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + inline
        frame = _all_sum_bytes(header, FRAME_BYTES, self.group, self.stream)
        self.stats.collectives += 1
        self.stats.bytes += FRAME_BYTES
        magic, length, crc = _HEADER.unpack_from(frame)
        if magic != MAGIC or length > MAX_PAYLOAD_BYTES:
            raise BusError("corrupt bus frame header: ranks are out of step")
        if length <= INLINE_BYTES:
            body = frame[_HEADER.size : _HEADER.size + length]
        else:
            # Round up so the few distinct shapes keep the collective cheap to set up.
            size = -(-length // FRAME_BYTES) * FRAME_BYTES
            body = _all_sum_bytes(payload, size, self.group, self.stream)[:length]
            self.stats.collectives += 1
            self.stats.bytes += size
        if zlib.crc32(body) != crc:
            raise BusError("bus frame failed its checksum: ranks are out of step")
        return body
