"""The status link: every worker pushes a small JSON report about itself to rank 0, once per heartbeat.

The plan link (runtime/bus.py) is lock-step: rank 0's engine thread reads exactly the frames
it expects at exactly the points it expects them, so nothing unsolicited may travel on it.
Reports therefore use their own connection, one per worker, read on rank 0 by a thread per
worker and written on each worker by a reporter thread. Neither thread touches the engine's
thread or its stream: a report reads plain counters (a torn read costs one stale figure, never
a step), and no collective and no device synchronisation is ever added to a step.

Rank 0 keeps the latest report of every rank (its own comes straight from its own reporter,
without a socket) in a `StatusBoard`, with the time it arrived. A report older than
`STALE_HEARTBEATS` heartbeats, or a connection that closed, marks the rank down.

The same connection carries one small notice, sent by the worker's reporter thread as soon as
there is one rather than at the next heartbeat (1 s by default, too slow for an admission):
`{"notice": "prefetched", "step": S}`, "my SSD reads of every plan up to S are done". Rank 0's
restore planner admits a request's SSD blocks only once every worker has sent it for the plan
that carried them (cache/restore_planner.py). It costs no collective and no step time: the
link is its own TCP connection, read on its own thread.

Wire format: the dialling worker sends MAGIC, its rank (u32 little-endian) and the run's
token (the plan link's, so only ranks of this run get in); then frames of a u32 length and
a JSON object of at most MAX_REPORT_BYTES. Rank 0 listens only while the group joins (like
the plan link), then closes the listening socket: a worker connects before the plan link.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAGIC = b"MXST"
MAX_REPORT_BYTES = 64 * 1024
STALE_HEARTBEATS = 3  # a report older than this many heartbeats marks the rank down
ACCEPT_WAIT_S = 5.0  # after the plan link joined, how long rank 0 waits for the last status connection
_LEN = struct.Struct("<I")


class StatusBoard:
    """Rank 0's latest report of every rank, and when it arrived (thread-safe)."""

    def __init__(self, world_size: int, heartbeat_s: float, clock: Callable[[], float] = time.monotonic):
        self.world_size = world_size
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self._lock = threading.Lock()
        self._reports: dict[int, dict] = {}
        self._received: dict[int, float] = {}
        self._previous: dict[int, tuple[float, dict]] = {}
        self._closed: set[int] = set()  # ranks whose status connection ended
        self._prefetched: dict[int, int] = {}  # rank -> the highest step whose SSD prefetch it has read
        self.on_prefetched: Callable[[], None] | None = None  # wakes rank 0's scheduler
        self.bad_reports = 0

    def put(self, rank: int, report: dict) -> None:
        now = self.clock()
        with self._lock:
            last = self._reports.get(rank)
            if last is not None:
                self._previous[rank] = (self._received[rank], last)
            self._reports[rank] = report
            self._received[rank] = now
            self._closed.discard(rank)

    def prefetched(self, rank: int, step: int) -> None:
        """Worker `rank` has read the prefetch lists of every plan up to `step`."""
        with self._lock:
            self._prefetched[rank] = max(step, self._prefetched.get(rank, -1))
        callback = self.on_prefetched
        if callback is not None:
            callback()

    def prefetched_through(self) -> int:
        """The highest step whose prefetch list every worker has read (-1: some worker none yet)."""
        with self._lock:
            return min((self._prefetched.get(r, -1) for r in range(1, self.world_size)), default=-1)

    def closed(self, rank: int) -> None:
        with self._lock:
            self._closed.add(rank)

    def stale_after_s(self) -> float:
        return STALE_HEARTBEATS * self.heartbeat_s + 1.0

    def snapshot(self) -> list[dict]:
        """One entry per rank: its last report plus `up`, `age_s` and rates since the report before."""
        now = self.clock()
        out = []
        with self._lock:
            for rank in range(self.world_size):
                report = self._reports.get(rank)
                if report is None:
                    out.append({"rank": rank, "up": False, "state": "unknown", "age_s": None})
                    continue
                age = now - self._received[rank]
                up = rank not in self._closed and age <= self.stale_after_s()
                entry = {**report, "rank": rank, "age_s": round(age, 2), "up": up}
                if not up:
                    entry["state"] = "down" if rank in self._closed else "unknown"
                entry.update(_rates(self._previous.get(rank), (self._received[rank], report)))
                out.append(entry)
        return out


def _rates(previous: tuple[float, dict] | None, current: tuple[float, dict]) -> dict:
    """tok/s and the share of wall time in the bus and the model between the last two reports."""
    if previous is None:
        return {"tok_s": 0.0, "bus_frac": 0.0, "model_frac": 0.0}
    (_, a), (_, b) = previous, current
    dt = b.get("t", 0) - a.get("t", 0)
    if dt <= 0:
        return {"tok_s": 0.0, "bus_frac": 0.0, "model_frac": 0.0}
    pa, pb = a.get("phase_s", {}), b.get("phase_s", {})
    return {
        "tok_s": round((b.get("gen_tokens", 0) - a.get("gen_tokens", 0)) / dt, 2),
        # A phase is counted when it ends, so one that straddles two reports can push a share past 1.
        "bus_frac": round(min(1.0, max(0.0, pb.get("bus", 0) - pa.get("bus", 0)) / dt), 4),
        "model_frac": round(min(1.0, max(0.0, pb.get("model", 0) - pa.get("model", 0)) / dt), 4),
    }


class ErrorCounter(logging.Handler):
    """Counts this process's log records of level WARNING and above, by level name."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        name = record.levelname.lower()
        self.counts[name] = self.counts.get(name, 0) + 1


_error_counter: ErrorCounter | None = None


def install_error_counter() -> ErrorCounter:
    global _error_counter
    if _error_counter is None:
        _error_counter = ErrorCounter()
        logging.getLogger().addHandler(_error_counter)
    return _error_counter


def collect_report(engine, rank: int, started_at: float) -> dict:
    """This rank's report: plain numbers read without waiting on the engine thread."""
    import mlx.core as mx

    executor = engine.executor
    report = {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "t": time.time(),
        "uptime_s": round(time.time() - started_at, 1),
        "state": "idle" if engine.idle else "busy",
        "mem_active": int(mx.get_active_memory()),
        "mem_peak": int(mx.get_peak_memory()),
        "mem_cache": int(mx.get_cache_memory()),  # freed buffers MLX keeps for reuse (counted in RSS on CPU)
        # The last step without its wait for the plan (on a worker that wait is rank 0's pace).
        "step_s": round(max(0.0, engine.last_work_s), 6),
        "bus_s": round(engine.last_phase_s.get("bus", 0.0), 6),
        "steps": executor.stats.steps,
        "active": executor.active,
        "gen_tokens": executor.stats.generation_tokens,
        "prompt_tokens": executor.stats.prompt_tokens,
        "phase_s": {k: round(v, 4) for k, v in dict(engine.phase_s).items()},
        "bus": dict(engine.bus.stats.__dict__),
        "errors": dict(_error_counter.counts) if _error_counter is not None else {},
    }
    cache = executor.prefix_cache
    if cache is not None:
        report["cache"] = cache.stats().to_dict()  # passed through as is: rank 0 reads its tiers from it
    return report


# ---- rank 0 ------------------------------------------------------------------------------
class StatusServer:
    """Accepts one authenticated status connection per worker while the group joins, then reads
    each worker's reports on its own thread into the board."""

    def __init__(self, board: StatusBoard, host: str, port: int, token: str, timeout_s: float):
        self.board = board
        self.token = token.encode()
        self.timeout_s = timeout_s
        self.joined = threading.Event()
        self._server = socket.create_server((host, port), reuse_port=False)
        self._server.settimeout(0.5)
        self._conns: dict[int, socket.socket] = {}

    def start(self) -> StatusServer:
        threading.Thread(target=self._accept_all, name="status-accept", daemon=True).start()
        return self

    def _accept_all(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while len(self._conns) < self.board.world_size - 1 and time.monotonic() < deadline:
                try:
                    conn, addr = self._server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed by close()
                rank = self._handshake(conn)
                if rank is None or rank in self._conns:
                    log.warning("status link: rejected a connection from %s", addr[0])
                    conn.close()
                    continue
                self._conns[rank] = conn
                threading.Thread(target=self._read, args=(rank, conn), name=f"status-{rank}", daemon=True).start()
            missing = sorted(set(range(1, self.board.world_size)) - set(self._conns))
            if missing:
                log.warning("status link: ranks %s never connected; they show as unknown", missing)
        finally:
            self._server.close()
            self.joined.set()

    def _handshake(self, conn: socket.socket) -> int | None:
        conn.settimeout(2.0)
        try:
            hello = _recv_exactly(conn, len(MAGIC) + 4 + len(self.token))
        except OSError:
            return None
        if hello is None or hello[:4] != MAGIC:
            return None
        (rank,) = struct.unpack("<I", hello[4:8])
        if not hmac.compare_digest(hello[8:], self.token) or not 0 < rank < self.board.world_size:
            return None
        return rank

    def _read(self, rank: int, conn: socket.socket) -> None:
        # A worker reports every heartbeat; silence for several means it is gone or stuck.
        conn.settimeout(max(30.0, self.board.stale_after_s() * 4))
        try:
            while True:
                header = _recv_exactly(conn, _LEN.size)
                if header is None:
                    break
                (length,) = _LEN.unpack(header)
                if length > MAX_REPORT_BYTES:
                    log.warning(
                        "status link: rank %d sent a %d-byte report (limit %d); closing", rank, length, MAX_REPORT_BYTES
                    )
                    break
                payload = _recv_exactly(conn, length)
                if payload is None:
                    break
                try:
                    report = json.loads(payload)
                except ValueError:
                    report = None
                if not isinstance(report, dict):
                    self.board.bad_reports += 1
                elif "notice" in report:
                    self._notice(rank, report)
                else:
                    self.board.put(rank, report)
        except OSError:
            pass
        finally:
            conn.close()
            self.board.closed(rank)

    def _notice(self, rank: int, notice: dict) -> None:
        step = notice.get("step")
        if notice.get("notice") == "prefetched" and type(step) is int:
            self.board.prefetched(rank, step)
        else:
            self.board.bad_reports += 1

    def wait_joined(self, timeout_s: float = ACCEPT_WAIT_S) -> None:
        self.joined.wait(timeout_s)

    def close(self) -> None:
        self._server.close()
        for conn in list(self._conns.values()):
            try:
                conn.close()
            except OSError:
                pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ---- workers -----------------------------------------------------------------------------
def dial(rank: int, host: str, port: int, token: str, timeout_s: float) -> socket.socket | None:
    """A worker's connection to rank 0's status link; None (and a warning) if it cannot be had:
    a rank serves without it, it only goes unseen on the dashboard."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=2.0)
            sock.sendall(MAGIC + struct.pack("<I", rank) + token.encode())
            return sock
        except OSError as e:
            if time.monotonic() > deadline:
                log.warning("status link: cannot reach rank 0 at %s:%d (%s); this rank reports nothing", host, port, e)
                return None
            time.sleep(0.1)


def send_report(sock: socket.socket, report: dict) -> None:
    payload = json.dumps(report, separators=(",", ":")).encode()
    if len(payload) > MAX_REPORT_BYTES:  # never expected; drop the pass-through part rather than the report
        payload = json.dumps({**report, "cache": None}, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(payload)) + payload)


class Reporter:
    """Builds this rank's report every heartbeat and hands it to `deliver` (a socket send on a
    worker, the board on rank 0), and delivers a notice as soon as one is given (the latest one
    only: a notice says how far something got). Runs on its own daemon thread until `stop()`,
    so whoever gives a notice never waits on the socket."""

    def __init__(self, build: Callable[[], dict], deliver: Callable[[dict], None], interval_s: float):
        self.build, self.deliver, self.interval_s = build, deliver, interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._notice: dict | None = None

    def start(self) -> Reporter:
        threading.Thread(target=self._run, name="status-reporter", daemon=True).start()
        return self

    def notify(self, notice: dict) -> None:
        """Send `notice` now (any thread), in place of one not sent yet."""
        with self._lock:
            self._notice = notice
        self._wake.set()

    def _run(self) -> None:
        next_report = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + self.interval_s
                    self.deliver(self.build())
                with self._lock:
                    notice, self._notice = self._notice, None
                if notice is not None:
                    self.deliver(notice)
            except OSError as e:
                log.warning("status link: rank 0 is no longer reading reports (%s)", e)
                return
            except Exception:  # a broken report must never end the rank
                log.exception("status link: could not build a report")
            self._wake.wait(max(0.0, next_report - time.monotonic()))
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


# ---- wiring, called from runtime/rank.py --------------------------------------------------
class RankStatus:
    """This rank's end of the status link: rank 0 listens and keeps the board, a worker dials."""

    def __init__(self, rank: int, world_size: int, addr: str, token: str, heartbeat_s: float, timeout_s: float):
        self.rank, self.heartbeat_s = rank, heartbeat_s
        self.started_at = time.time()
        self.board = StatusBoard(world_size, heartbeat_s) if rank == 0 else None
        self.server: StatusServer | None = None
        self.sock: socket.socket | None = None
        self.reporter: Reporter | None = None
        self._dialer: threading.Thread | None = None
        self._prefetched_lock = threading.Lock()
        self._prefetched_step = -1
        install_error_counter()
        if world_size == 1 or not addr:
            return
        host, _, port = addr.rpartition(":")
        if rank == 0:
            try:
                self.server = StatusServer(self.board, host, int(port), token, timeout_s).start()
            except OSError as e:  # the dashboard loses the workers' figures; serving goes on
                log.warning("status link: cannot listen on %s (%s); workers report nothing", addr, e)
        else:
            # Dialled on its own thread: a rank 0 that cannot listen must not hold up the plan link.
            def dial_rank0() -> None:
                self.sock = dial(rank, host, int(port), token, timeout_s)

            self._dialer = threading.Thread(target=dial_rank0, name="status-dial", daemon=True)
            self._dialer.start()

    def joined(self) -> None:
        """Rank 0, once the plan link has joined: give the last status connection a moment, so the
        listening socket is closed by the time the cluster says it is ready."""
        if self.server is not None:
            self.server.wait_joined()

    def start(self, engine, on_report: Callable[[dict], None] | None = None) -> None:
        def build() -> dict:
            return collect_report(engine, self.rank, self.started_at)

        if self.board is not None:

            def deliver(report: dict) -> None:
                self.board.put(0, report)
                if on_report is not None:
                    on_report(report)

        elif self._dialer is not None:
            dialer = self._dialer

            def deliver(report: dict) -> None:
                dialer.join()  # the first report waits for the connection (on the reporter thread)
                if self.sock is None:
                    raise OSError("no status link to rank 0")
                self.sock.settimeout(10.0)  # a report that cannot leave in 10 s ends the reporting, not the rank
                send_report(self.sock, report)

        else:
            return
        self.reporter = Reporter(build, deliver, self.heartbeat_s).start()

    def track_prefetches(self, prefix_cache, frontend) -> None:
        """Several ranks: a worker tells rank 0 when its SSD prefetch reads are done; rank 0's
        restore planner admits SSD blocks once every worker has (cache/restore_planner.py)."""
        if self.board is not None:
            if frontend.restores is not None:
                frontend.restores.workers_read_through = self.board.prefetched_through
            self.board.on_prefetched = frontend.wake_up
        else:
            prefix_cache.on_prefetched = self.prefetched

    def prefetched(self, step: int) -> None:
        """This worker's SSD reads of every plan up to `step` are done (reader or engine thread)."""
        with self._prefetched_lock:  # two threads may call: the notice only ever moves forward
            if step <= self._prefetched_step or self.reporter is None:
                return
            self._prefetched_step = step
            self.reporter.notify({"notice": "prefetched", "step": step})

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        if self.server is not None:
            self.server.close()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
