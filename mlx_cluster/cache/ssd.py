"""The SSD tier: this rank's blocks as files under `<dir>/v<format>/<model fingerprint>/tp<N>/rank<r>/`.

* The engine never touches the disk. Reads are prefetched: `prefetch(ids)` queues block ids for
  a reader thread, which reads and verifies each file (see blockfile.py) into host memory
  (the staging area, bounded in bytes and age); `take(id)` on the engine thread adopts a
  staged block, or a block still queued for writing, or returns None. Rank 0 decides whether a
  request waits for its prefetch (cache/cost.py); nothing ever waits inside a step.
* Writes go through one bounded queue to one writer thread, which writes a temp file in the
  same directory and renames it into place, so a reader sees a whole file or none. No fsync:
  a cache needs no durability, and a file a crash left short or empty fails its checks on
  read (size, checksum) and is a counted miss. fsync per 2 MB block held the writer to a
  third of the disk's speed here (353 against 957 MB/s), and at c=32 on a GPU the writer
  dropped about as many blocks as it wrote. A full queue (in items or bytes) drops the write
  and counts it.
* A worker tells rank 0 when the reads of a plan's prefetch list are done: `mark(step)` after
  queueing them calls `on_reads_done(step)` once every read queued so far has finished (reads
  run in order), so rank 0 plans those blocks only once every rank has read them
  (cache/restore_planner.py).
* A damaged or foreign file is deleted, counted and treated as a miss.
* Size is capped (least recently accessed files go first; a read touches the file) and files
  not accessed for `ttl_s` expire, checked at startup and periodically by the writer.
* Files of an older on-disk format (an older `v<format>` directory, or version 1's layout
  without one) are deleted at startup, with one log line.
* Any write failure (unwritable directory, disk full) disables the tier: one warning, an
  error count, `disabled` in the stats, and serving carries on without it.

Blocks can differ between ranks here (a dropped write, a wiped disk, a slower disk): restores
agree on what every rank has in memory before using it (see prefix_cache.py).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from mlx_cluster.cache import blockfile
from mlx_cluster.cache.blocks import Block
from mlx_cluster.cache.cost import Ewma
from mlx_cluster.cache.hashing import FORMAT_VERSION

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Tests only: "RANK:SECONDS" makes that rank's SSD reads that much slower each (a slow disk).
TEST_READ_DELAY_ENV = "MLX_CLUSTER_TEST_SSD_READ_DELAY"


def read_delay_for_tests(rank: int, environ=os.environ) -> float:
    """The read delay TEST_READ_DELAY_ENV asks of `rank` (0 when unset or for another rank)."""
    value = environ.get(TEST_READ_DELAY_ENV, "")
    if not value:
        return 0.0
    try:
        which, seconds = value.split(":")
        return float(seconds) if int(which) == rank else 0.0
    except ValueError:
        raise ValueError(f"{TEST_READ_DELAY_ENV}={value!r}: expected RANK:SECONDS, e.g. 1:0.05") from None


@dataclass
class SsdStats:
    """Counters of this rank's SSD tier (blocks and bytes are current, the rest cumulative)."""

    dir: str = ""
    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    read_bytes: int = 0
    read_s: float = 0.0  # reading and verifying, on the reader thread
    prefetched: int = 0  # blocks read ahead into host memory
    prefetch_adopted: int = 0  # ... and then used by a restore
    prefetch_wasted: int = 0  # ... and dropped unused (staging full or too old)
    staged_blocks: int = 0
    staged_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0
    pending_writes: int = 0
    dropped_writes: int = 0  # the write queue was full
    corrupt: int = 0  # files that failed verification and were deleted
    evictions: int = 0  # deleted to stay under the size cap
    expired: int = 0  # deleted by the TTL
    errors: int = 0
    disabled: bool = False
    disabled_reason: str = ""


class SsdTier:
    def __init__(
        self,
        root: str | Path,
        *,
        fingerprint: str,
        tp_size: int,
        rank: int,
        metadata: dict[str, str],
        max_bytes: int,
        ttl_s: float,
        max_pending_writes: int = 4096,
        max_pending_bytes: int = 1 << 30,
        max_staged_bytes: int = 1 << 30,
        staged_ttl_s: float = 120.0,
        prune_interval_s: float = 60.0,
    ):
        self.root = Path(root).expanduser()
        self.dir = self.root / f"v{FORMAT_VERSION}" / fingerprint / f"tp{tp_size}" / f"rank{rank}"
        self._dir_str = str(self.dir)
        self._legacy_dir = self.root / fingerprint / f"tp{tp_size}" / f"rank{rank}"  # version 1's layout
        self.metadata = metadata  # what every file of ours carries (namespace, rank)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.prune_interval_s = prune_interval_s
        self.max_pending_bytes = max_pending_bytes  # queued blocks hold memory (evicted ones only here)
        self._pending_bytes = 0
        self.stats = SsdStats(dir=str(self.dir), capacity_bytes=max_bytes)
        self._lock = threading.Lock()  # guards _index, _pending, _epoch and the byte counts
        self._index: OrderedDict[bytes, int] = OrderedDict()  # block id -> file size, least recently used first
        self._pending: dict[bytes, Block] = {}  # queued, not yet on disk: still readable
        self._epoch = 0  # bumped by clear(): queued writes of an older epoch are discarded
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_writes)
        self._thread: threading.Thread | None = None
        # Prefetching: ids queued or being read, and verified blocks waiting in host memory.
        self.max_staged_bytes = max_staged_bytes
        self.staged_ttl_s = staged_ttl_s
        self._inflight: set[bytes] = set()
        self._staged: OrderedDict[bytes, tuple[blockfile.HostBlock, float]] = OrderedDict()
        self._prefetch_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self.read_cost = Ewma()  # seconds per byte to read and verify, measured on every read
        self.on_staged = None  # called on the reader thread when the queued reads are done (rank 0 wakes its scheduler)
        # Read progress, for mark(): reads queued and finished so far, and marks not yet reached.
        self._reads_queued = 0
        self._reads_done = 0
        self._marks: deque[tuple[int, int]] = deque()  # (reads queued when marked, step)
        self.on_reads_done = None  # called with a marked step once its reads are done (a worker tells rank 0)
        self._test_read_delay_s = read_delay_for_tests(rank)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe.{os.getpid()}.tmp"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._drop_old_formats()
            self._scan()
        except OSError as e:
            self._disable(f"cannot use {self.dir}: {e}")
            return
        self.prune()
        self._thread = threading.Thread(target=self._writer, name="kv-ssd-writer", daemon=True)
        self._thread.start()
        self._reader = threading.Thread(target=self._read_ahead, name="kv-ssd-reader", daemon=True)
        self._reader.start()

    # ---- queries (engine thread; rank 0 plans with contains()) --------------------------
    @property
    def enabled(self) -> bool:
        return not self.stats.disabled

    def contains(self, block_id: bytes) -> bool:
        """Whether this tier has the block (read-only: no access-time update)."""
        return self.enabled and self._has(block_id)

    def _has(self, block_id: bytes) -> bool:
        """On disk or queued for writing."""
        return block_id in self._index or block_id in self._pending

    def _path(self, block_id: bytes) -> str:
        # A plain string, not a Path: pathlib interns every path part (sys.intern), and with a
        # name per block the interpreter's interned-string table grew and was reallocated under
        # a long soak (a one-off +1.92 MB step of native memory on every rank; docs/operations.md).
        return os.path.join(self._dir_str, block_id.hex() + SUFFIX)

    def read(self, block_id: bytes, expected: dict[str, str] | None = None) -> Block | None:
        """Load and verify a block now, on the calling thread (tools and tests; the engine uses
        prefetch and take). None (a miss) if absent or bad."""
        with self._lock:
            block = self._pending.get(block_id)
        if block is not None:
            self.stats.hits += 1
            return block
        host = self._read_host(block_id, expected)
        return host.to_block() if host is not None else None

    def _read_host(self, block_id: bytes, expected: dict[str, str] | None = None) -> blockfile.HostBlock | None:
        """Read and verify a file into host memory (any thread, no MLX), touching its access time."""
        if not self.enabled:
            return None
        with self._lock:
            known = block_id in self._index
        if not known:
            self.stats.misses += 1
            return None
        path = self._path(block_id)
        t0 = time.perf_counter()
        if self._test_read_delay_s:
            time.sleep(self._test_read_delay_s)
        try:
            with open(path, "rb") as f:
                data = f.read()
            host = blockfile.parse(data, {**self.metadata, **(expected or {}), "block": block_id.hex()})
        except FileNotFoundError:
            self._forget(block_id)
            self.stats.misses += 1
            return None
        except blockfile.BlockFileError as e:
            log.warning("SSD KV block %s is unusable (%s): deleting it", os.path.basename(path), e)
            self.stats.corrupt += 1
            self._delete(block_id)
            self.stats.misses += 1
            return None
        except OSError as e:
            self.stats.errors += 1
            self.stats.misses += 1
            log.warning("cannot read SSD KV block %s: %s", path, e)
            return None
        elapsed = time.perf_counter() - t0
        self.stats.read_s += elapsed
        self.stats.read_bytes += len(data)
        self.read_cost.add(elapsed / max(1, len(data)))
        self.stats.hits += 1
        now = time.time()
        try:
            os.utime(path, (now, now))  # the access time drives LRU and TTL, also across restarts
        except OSError:
            pass
        with self._lock:
            if block_id in self._index:
                self._index.move_to_end(block_id)
        return host

    # ---- prefetch (any thread queues, the reader thread reads, the engine thread takes) ----
    def prefetch(self, ids) -> int:
        """Queue reads of the blocks in `ids` this tier has on disk and not yet in memory; how
        many were queued. Never blocks."""
        if not self.enabled or self._reader is None:
            return 0
        queued = 0
        with self._lock:
            self._expire_staged(time.monotonic())
            for block_id in ids:
                if block_id in self._index and not (
                    block_id in self._staged or block_id in self._inflight or block_id in self._pending
                ):
                    self._inflight.add(block_id)
                    self._prefetch_queue.put(block_id)
                    queued += 1
            self._reads_queued += queued
        return queued

    def mark(self, step: int) -> None:
        """Call `on_reads_done(step)` once every read queued so far has finished: at once when
        none is pending, else on the reader thread after the last of them."""
        with self._lock:
            pending = self._reads_done < self._reads_queued and self._reader is not None
            if pending:
                self._marks.append((self._reads_queued, step))
        if not pending and self.on_reads_done is not None:
            self.on_reads_done(step)

    def state(self, block_id: bytes) -> str:
        """Where a block is for a restore: "memory" (queued for writing: take() has it on the
        device), "staged" (read: take() has it in host memory), "reading" (prefetch in flight),
        "disk" (not prefetched) or "absent"."""
        with self._lock:
            if block_id in self._pending:
                return "memory"
            if block_id in self._staged:
                return "staged"
            if block_id in self._inflight:
                return "reading"
            return "disk" if block_id in self._index and self.enabled else "absent"

    def file_bytes(self, block_id: bytes) -> int:
        with self._lock:
            return self._index.get(block_id, 0)

    def take(self, block_id: bytes) -> Block | None:
        """A block already in memory (prefetched, or queued for writing), for a restore on the
        engine thread; None otherwise. Never reads the disk."""
        with self._lock:
            block = self._pending.get(block_id)
            if block is not None:
                self.stats.hits += 1
                return block
            entry = self._unstage(block_id)
        if entry is None:
            return None
        self.stats.prefetch_adopted += 1
        return entry[0].to_block()

    def _read_ahead(self) -> None:
        while True:
            block_id = self._prefetch_queue.get()
            if block_id is None:
                return
            host = self._read_host(block_id) if self.enabled else None
            reached = None
            with self._lock:
                self._inflight.discard(block_id)
                self._reads_done += 1
                while self._marks and self._marks[0][0] <= self._reads_done:
                    reached = self._marks.popleft()[1]
                if host is not None:
                    while self._staged and self.stats.staged_bytes + host.nbytes > self.max_staged_bytes:
                        self._unstage(next(iter(self._staged)))  # the oldest makes room
                        self.stats.prefetch_wasted += 1
                    self._staged[block_id] = (host, time.monotonic())
                    self.stats.staged_bytes += host.nbytes
                    self.stats.staged_blocks = len(self._staged)
                    self.stats.prefetched += 1
            if reached is not None and self.on_reads_done is not None:
                self.on_reads_done(reached)
            callback = self.on_staged
            if callback is not None and not self._inflight:
                callback()  # once per burst of reads, not per block

    def _expire_staged(self, now: float) -> None:
        """Drop staged blocks nobody took in time (a cancelled request's). Holds the lock."""
        while self._staged:
            block_id, (_, staged_at) = next(iter(self._staged.items()))
            if now - staged_at < self.staged_ttl_s:
                break
            self._unstage(block_id)
            self.stats.prefetch_wasted += 1

    def _unstage(self, block_id: bytes):
        """Remove a staged block, keeping the counts; its (host block, time) or None. Holds the lock."""
        entry = self._staged.pop(block_id, None)
        if entry is not None:
            self.stats.staged_bytes -= entry[0].nbytes
            self.stats.staged_blocks = len(self._staged)
        return entry

    # ---- writes (engine thread enqueues, the writer thread writes) ------------------------
    def admit(self, blocks: list[tuple[bytes, Block]]) -> list[tuple[bytes, Block]]:
        """The (id, block) pairs the write queue would take now: not on disk or queued already,
        and inside the queue's byte and item bounds. The rest count as dropped writes. Lets the
        engine make host copies (blocks.for_host) only of blocks that will be written."""
        if not self.enabled:
            return []
        with self._lock:
            room = self.max_pending_bytes - self._pending_bytes
            slots = self._queue.maxsize - self._queue.qsize()
            taken = []
            for block_id, block in blocks:
                if self._has(block_id):
                    continue
                if block.nbytes > room or slots <= 0:
                    self.stats.dropped_writes += 1
                    continue
                taken.append((block_id, block))
                room -= block.nbytes
                slots -= 1
        return taken

    def write(self, block_id: bytes, block: Block, wait_s: float = 0.0) -> None:
        """Queue a block for writing. The engine never waits (wait_s=0): a full queue drops the
        write and counts it. Shutdown passes wait_s to flush the RAM tier."""
        if not self.enabled:
            return
        with self._lock:
            if self._has(block_id):
                return
            if self._pending_bytes + block.nbytes > self.max_pending_bytes and not wait_s:
                self.stats.dropped_writes += 1
                return
            self._pending[block_id] = block
            self._pending_bytes += block.nbytes
            self.stats.pending_writes = len(self._pending)
            epoch = self._epoch
        item = (epoch, block_id, block)
        try:
            if wait_s:
                self._queue.put(item, timeout=wait_s)
            else:
                self._queue.put_nowait(item)
        except queue.Full:
            self._unpend(block_id, block)
            self.stats.dropped_writes += 1

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued writes are on disk (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._pending and self.enabled and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._pending

    def _writer(self) -> None:
        next_prune = time.monotonic() + self.prune_interval_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_prune - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                self._write_one(*item)
            if time.monotonic() >= next_prune:
                self.prune()
                next_prune = time.monotonic() + self.prune_interval_s

    def _write_one(self, epoch: int, block_id: bytes, block: Block) -> None:
        try:
            if self.enabled and epoch == self._epoch:
                chunks = blockfile.encode_chunks(block, {**self.metadata, "block": block_id.hex()})
                self._write_file(epoch, block_id, chunks)
        except OSError as e:
            self._disable(f"writing to {self.dir} failed: {e}")
        except Exception as e:  # a bug must not kill the writer silently
            self.stats.errors += 1
            log.exception("SSD KV write of %s failed: %s", block_id.hex(), e)
        finally:
            self._unpend(block_id, block)

    def _unpend(self, block_id: bytes, block: Block) -> None:
        with self._lock:
            if self._pending.get(block_id) is block:
                del self._pending[block_id]
                self._pending_bytes -= block.nbytes
            self.stats.pending_writes = len(self._pending)

    def _write_file(self, epoch: int, block_id: bytes, chunks: list) -> None:
        final = self._path(block_id)
        tmp = os.path.join(self._dir_str, f".{block_id.hex()}.{os.getpid()}.tmp")
        size = sum(len(c) for c in chunks)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        with self._lock:
            if epoch != self._epoch:  # cleared meanwhile
                _unlink(tmp)
                return
            os.replace(tmp, final)
            old = self._index.pop(block_id, 0)
            self._index[block_id] = size
            self.stats.bytes += size - old
            self.stats.blocks = len(self._index)
        self.stats.writes += 1
        self.stats.write_bytes += size
        if self.stats.bytes > self.max_bytes:
            self._evict_to(self.max_bytes)

    # ---- housekeeping ---------------------------------------------------------------
    def _drop_old_formats(self) -> None:
        """Delete this rank's files of older on-disk formats: their ids can never be looked up
        again (the format version is part of every id), so they would only hold disk space."""
        old = [self._legacy_dir] + [
            self.root / f"v{v}" / self.dir.relative_to(self.root / f"v{FORMAT_VERSION}")
            for v in range(2, FORMAT_VERSION)
        ]
        removed = 0
        for d in old:
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                if entry.is_file() and (entry.name.endswith(SUFFIX) or entry.name.endswith(".tmp")):
                    _unlink(entry.path)
                    removed += 1
            for parent in (d, d.parent, d.parent.parent):  # rank<r>, tp<N>, <fingerprint> when empty
                try:
                    parent.rmdir()
                except OSError:
                    break
        if removed:
            log.info("SSD KV tier: deleted %d block file(s) of an older format under %s", removed, self.root)

    def _scan(self) -> None:
        """Index the files already here (oldest access first) and remove stale temp files."""
        entries = []
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.endswith(".tmp"):
                _unlink(entry.path)
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                block_id = bytes.fromhex(name[: -len(SUFFIX)])
                st = entry.stat()
            except (ValueError, OSError):
                continue
            entries.append((st.st_mtime, block_id, st.st_size))
        entries.sort()
        with self._lock:
            self._index = OrderedDict((b, size) for _, b, size in entries)
            self.stats.bytes = sum(size for _, _, size in entries)
            self.stats.blocks = len(self._index)

    def prune(self) -> None:
        """Delete files not accessed within the TTL, then enforce the size cap."""
        if not self.enabled:
            return
        cutoff = time.time() - self.ttl_s
        with self._lock:
            by_age = list(self._index)
        for block_id in by_age:
            try:
                mtime = os.stat(self._path(block_id)).st_mtime
            except FileNotFoundError:
                self._forget(block_id)
                continue
            except OSError:
                continue
            if mtime >= cutoff:
                break  # the index is in access order: everything after is newer
            self._delete(block_id)
            self.stats.expired += 1
        self._evict_to(self.max_bytes)

    def _evict_to(self, max_bytes: int) -> None:
        while self.stats.bytes > max_bytes:
            with self._lock:
                if not self._index:
                    return
                block_id = next(iter(self._index))
            self._delete(block_id)
            self.stats.evictions += 1

    def _forget(self, block_id: bytes) -> None:
        with self._lock:
            size = self._index.pop(block_id, None)
            if size is not None:
                self.stats.bytes -= size
                self.stats.blocks = len(self._index)

    def _delete(self, block_id: bytes) -> None:
        self._forget(block_id)
        try:
            _unlink(self._path(block_id))
        except OSError as e:
            self.stats.errors += 1
            log.warning("cannot delete SSD KV block %s: %s", block_id.hex(), e)

    def _disable(self, reason: str) -> None:
        self.stats.errors += 1
        if self.stats.disabled:
            return
        self.stats.disabled = True
        self.stats.disabled_reason = reason
        log.warning("SSD KV cache tier disabled: %s; serving continues with the RAM tier only", reason)
        with self._lock:
            self._pending.clear()
            self._pending_bytes = 0
            self.stats.pending_writes = 0

    def clear(self) -> None:
        """Delete every block of this rank (queued writes are discarded)."""
        with self._lock:
            self._epoch += 1
            self._pending.clear()
            self._pending_bytes = 0
            self.stats.pending_writes = 0
            self._staged.clear()
            self.stats.staged_blocks = self.stats.staged_bytes = 0
            ids = list(self._index)
        for block_id in ids:
            self._delete(block_id)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish queued writes (up to `timeout_s`) and stop the writer and reader threads."""
        if self._reader is not None:
            self._prefetch_queue.put(None)
            self._reader = None
        if self._thread is None:
            return
        self.flush(timeout_s)
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(timeout=1.0)
        self._thread = None


def _unlink(path: str) -> None:
    """Remove a file if it is there (os.remove on a string: no pathlib, see _path)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
