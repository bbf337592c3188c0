"""The SSD tier on its own: atomic writes, verification, size cap, TTL, failure handling."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cluster.cache.blocks import Block
from mlx_cluster.cache.hashing import FORMAT_VERSION, Namespace
from mlx_cluster.cache.ssd import TEST_READ_DELAY_ENV, SsdTier, read_delay_for_tests

NS = Namespace("ab" * 32, tp_size=1, dtype="float32", kv_bits=None, kv_group_size=64, block_size=4)


def block(seed: int, tokens: int = 4) -> Block:
    mx.random.seed(seed)
    k = mx.random.normal((2, 2, tokens, 8))
    v = mx.random.normal((2, 2, tokens, 8))
    mx.eval(k, v)
    return Block({"k": k, "v": v}, tokens, k.nbytes + v.nbytes)


def tier(root, ns: Namespace = NS, rank: int = 0, **kw) -> SsdTier:
    kw.setdefault("max_bytes", 10**9)
    kw.setdefault("ttl_s", 3600.0)
    return SsdTier(
        root,
        fingerprint=ns.model_fingerprint,
        tp_size=ns.tp_size,
        rank=rank,
        metadata={**ns.fields(), "rank": str(rank)},
        **kw,
    )


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def written(t: SsdTier, *ids: int) -> SsdTier:
    for i in ids:
        t.write(bid(i), block(i))
    assert t.flush(10)
    return t


def test_round_trip_and_layout(tmp_path):
    t = written(tier(tmp_path), 1)
    assert t.dir == tmp_path / f"v{FORMAT_VERSION}" / NS.model_fingerprint / "tp1" / "rank0"
    files = os.listdir(t.dir)
    assert files == [bid(1).hex() + ".safetensors"]  # no temp file left behind
    got = t.read(bid(1))
    assert got is not None and mx.array_equal(got.arrays["k"], block(1).arrays["k"])
    assert t.stats.hits == 1 and t.stats.read_bytes > 0 and t.stats.writes == 1
    assert t.read(bid(2)) is None and t.stats.misses == 1
    t.close()


def test_block_file_names_are_never_interned(tmp_path):
    """pathlib interns every path part, and the interned-string table only ever grows to the
    most names alive at once (its dead entries are reused, never given back): with one name per
    block that was a native-memory step under a soak. The tier uses plain strings for block files."""
    t = written(tier(tmp_path), 1)
    paths = [t._path(bid(i)) for i in range(100, 140)]  # held, as a read or write in flight holds one
    for i in range(100, 140):
        fresh = "".join(list(bid(i).hex() + ".safetensors"))  # a new object
        assert sys.intern(fresh) is fresh, "a block file name was interned"
    assert t.read(bid(1)) is not None and os.path.exists(paths[0]) is False
    t.close()


def test_files_of_an_older_format_are_deleted_at_start(tmp_path, caplog):
    legacy = tmp_path / NS.model_fingerprint / "tp1" / "rank0"  # version 1's layout
    legacy.mkdir(parents=True)
    (legacy / (bid(1).hex() + ".safetensors")).write_bytes(b"old")
    (legacy / ".x.tmp").write_bytes(b"old")
    other = tmp_path / NS.model_fingerprint / "tp2" / "rank0"  # another layout's files are not ours to touch
    other.mkdir(parents=True)
    (other / (bid(1).hex() + ".safetensors")).write_bytes(b"old")
    with caplog.at_level("INFO"):
        t = tier(tmp_path)
    assert not legacy.exists() and (other / (bid(1).hex() + ".safetensors")).exists()
    assert "deleted 2 block file(s) of an older format" in caplog.text
    assert t.stats.blocks == 0 and not t.contains(bid(1))
    t.close()


def test_prefetch_reads_in_the_background_and_take_never_touches_the_disk(tmp_path):
    written(tier(tmp_path), 1, 2, 3).close()
    t = tier(tmp_path)
    woken = []
    t.on_staged = lambda: woken.append(1)
    assert t.take(bid(1)) is None  # on disk, not prefetched: the engine does not read it
    assert t.state(bid(1)) == "disk" and t.state(bid(9)) == "absent"
    assert t.prefetch([bid(1), bid(2), bid(9)]) == 2  # 9 is not on disk
    deadline = time.monotonic() + 10
    while t.state(bid(2)) != "staged" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.state(bid(1)) == t.state(bid(2)) == "staged" and woken  # read into host memory
    assert t.stats.prefetched == 2 and t.stats.staged_blocks == 2 and t.read_cost.value > 0
    got = t.take(bid(2))
    assert got is not None and mx.array_equal(got.arrays["k"], block(2).arrays["k"])
    assert t.take(bid(2)) is None  # taken once; the caller promotes it to RAM
    assert t.stats.prefetch_adopted == 1 and t.stats.staged_blocks == 1
    t.close()


def test_a_mark_fires_once_every_read_queued_before_it_is_done(tmp_path):
    written(tier(tmp_path), 1, 2, 3).close()
    t = tier(tmp_path)
    done = []
    t.on_reads_done = done.append
    t.mark(1)
    assert done == [1]  # nothing being read: at once
    gate = threading.Event()
    read = t._read_host
    t._read_host = lambda *a, **kw: gate.wait(10) and read(*a, **kw)  # a disk that waits for the test
    t.prefetch([bid(1), bid(2)])
    t.mark(2)
    t.prefetch([bid(2), bid(9)])  # already being read, and not on disk: nothing new to wait for
    t.mark(3)
    assert done == [1]
    gate.set()
    deadline = time.monotonic() + 10
    while done == [1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [1, 3] and t.state(bid(2)) == "staged"  # one call for the marks the last read reached
    t.close()


def test_the_read_delay_for_tests_names_a_rank():
    env = {TEST_READ_DELAY_ENV: "1:0.25"}
    assert read_delay_for_tests(1, env) == 0.25 and read_delay_for_tests(0, env) == 0.0
    assert read_delay_for_tests(1, {}) == 0.0
    with pytest.raises(ValueError, match="RANK:SECONDS"):
        read_delay_for_tests(1, {TEST_READ_DELAY_ENV: "0.25"})


def test_staging_is_bounded_and_expires(tmp_path):
    written(tier(tmp_path), 1, 2, 3).close()
    one = block(1).nbytes
    t = tier(tmp_path, max_staged_bytes=int(one * 1.5), staged_ttl_s=0.2)
    t.prefetch([bid(1), bid(2)])
    deadline = time.monotonic() + 10
    while t.stats.prefetched < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.stats.staged_blocks == 1 and t.stats.prefetch_wasted == 1  # the older one made room
    time.sleep(0.3)
    t.prefetch([])  # expiry runs when prefetches are queued
    assert t.stats.staged_blocks == 0 and t.stats.prefetch_wasted == 2
    t.close()


def test_restart_finds_earlier_blocks(tmp_path):
    written(tier(tmp_path), 1, 2).close()
    again = tier(tmp_path)
    assert again.contains(bid(1)) and again.contains(bid(2)) and again.stats.blocks == 2
    assert again.read(bid(2)) is not None
    again.close()


def test_pending_writes_are_readable_and_a_full_queue_drops(tmp_path):
    t = tier(tmp_path, max_pending_writes=1)
    t.close()  # no writer any more: queued writes stay queued
    t.write(bid(1), block(1))
    assert t.contains(bid(1)) and t.read(bid(1)) is not None  # served from the queue
    t.write(bid(2), block(2))  # the queue is full: dropped and counted, the caller never waits
    assert t.stats.dropped_writes == 1 and not t.contains(bid(2)) and t.stats.pending_writes == 1


def test_queued_bytes_are_bounded_too(tmp_path):
    t = tier(tmp_path, max_pending_bytes=int(block(1).nbytes * 1.5))
    t.close()
    t.write(bid(1), block(1))
    t.write(bid(2), block(2))
    assert t.stats.dropped_writes == 1 and t.contains(bid(1)) and not t.contains(bid(2))


def test_admit_takes_what_the_queue_would_and_counts_the_rest_as_dropped(tmp_path):
    """The engine copies blocks for the writer (on CUDA) only after admit(): no copy for a
    block already on disk or queued, none for one the full queue would drop."""
    t = tier(tmp_path, max_pending_bytes=int(block(1).nbytes * 2.5))
    t.close()
    t.write(bid(1), block(1))  # queued
    offered = [(bid(i), block(i)) for i in (1, 2, 3, 4)]
    assert [i for i, _ in t.admit(offered)] == [bid(2)]  # 1 is queued; room for one more block
    assert t.stats.dropped_writes == 2  # 3 and 4


def corrupt_by(kind: str, path):
    data = path.read_bytes()
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif kind == "bitflip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif kind == "garbage-header":
        path.write_bytes(b"\xff" * 8 + data[8:])
    elif kind == "not-json":
        path.write_bytes((20).to_bytes(8, "little") + b"{" * 20 + data[8:])


@pytest.mark.parametrize("kind", ["zero", "truncated", "bitflip", "garbage-header", "not-json"])
def test_damaged_files_are_misses_and_deleted(tmp_path, kind):
    t = written(tier(tmp_path), 1)
    path = t.dir / (bid(1).hex() + ".safetensors")
    corrupt_by(kind, path)
    assert t.read(bid(1)) is None
    assert not path.exists() and t.stats.corrupt == 1 and not t.contains(bid(1))
    assert not t.stats.disabled  # one bad file does not take the tier down
    t.close()


def test_foreign_files_are_misses_and_deleted(tmp_path):
    other = Namespace(**{**NS.__dict__, "kv_bits": 8})  # same directory, different namespace
    src = written(tier(tmp_path, other), 1)
    src.close()
    t = tier(tmp_path)
    assert t.contains(bid(1))  # rank 0's index only lists names; the read verifies
    assert t.read(bid(1)) is None and t.stats.corrupt == 1
    # A file renamed to another block's id is foreign too (the id is in its metadata).
    written(t, 2)
    os.rename(t.dir / (bid(2).hex() + ".safetensors"), t.dir / (bid(5).hex() + ".safetensors"))
    t2 = tier(tmp_path)
    assert t2.read(bid(5)) is None and t2.stats.corrupt == 1
    # A block from another rank's directory carries its rank.
    r1 = written(tier(tmp_path, rank=1), 7)
    r1.close()
    os.rename(r1.dir / (bid(7).hex() + ".safetensors"), t2.dir / (bid(7).hex() + ".safetensors"))
    t3 = tier(tmp_path)
    assert t3.read(bid(7)) is None and t3.stats.corrupt == 1
    for x in (t, t2, t3):
        x.close()


def test_size_cap_evicts_least_recently_accessed(tmp_path):
    t = written(tier(tmp_path), 1)
    size = t.stats.bytes
    t.close()
    t = tier(tmp_path, max_bytes=int(size * 2.5))
    written(t, 2)
    assert t.read(bid(1)) is not None  # 1 is now more recent than 2
    written(t, 3)
    assert t.stats.blocks == 2 and t.stats.evictions == 1
    assert t.contains(bid(1)) and t.contains(bid(3)) and not t.contains(bid(2))
    assert t.stats.bytes <= t.max_bytes
    t.close()


def test_ttl_prunes_old_files_at_startup(tmp_path):
    t = written(tier(tmp_path), 1, 2)
    t.close()
    old = time.time() - 7200
    os.utime(t.dir / (bid(1).hex() + ".safetensors"), (old, old))
    t = tier(tmp_path, ttl_s=3600)
    assert not t.contains(bid(1)) and t.contains(bid(2)) and t.stats.expired == 1
    assert not (t.dir / (bid(1).hex() + ".safetensors")).exists()
    t.close()


def test_stale_temp_files_are_removed_at_startup(tmp_path):
    t = written(tier(tmp_path), 1)
    t.close()
    (t.dir / ".deadbeef.123.tmp").write_bytes(b"partial")
    t = tier(tmp_path)
    assert os.listdir(t.dir) == [bid(1).hex() + ".safetensors"]
    t.close()


NOBODY = 65534


def as_unprivileged_user(check) -> None:
    """Run check() without root's privileges, since root ignores directory permissions: in a
    forked child that drops to uid/gid 65534 when the tests run as root, directly otherwise.
    A failure in the child fails the test here, with its message."""
    if os.geteuid() != 0:
        check()
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            check()
            os.write(write_end, b"ok")
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            os.write(write_end, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode(errors="replace")
    os.waitpid(pid, 0)
    assert result == "ok", result


def test_unwritable_directory_disables_the_tier():
    # A directory the unprivileged child owns and can reach (pytest's tmp_path is root-only).
    base = Path(tempfile.mkdtemp(prefix="mlxc-ssd-"))
    base.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(base, NOBODY, NOBODY)
    one = block(1)  # built here: the child runs no MLX computation after the fork

    def check():
        assert os.geteuid() != 0
        root = base / "ro"
        root.mkdir()
        root.chmod(0o500)
        t = tier(root)
        assert t.stats.disabled and t.stats.errors == 1 and "cannot use" in t.stats.disabled_reason, t.stats
        t.write(bid(1), one)  # a no-op, no exception
        assert t.read(bid(1)) is None and not t.contains(bid(1))
        assert not any(root.iterdir())

    try:
        as_unprivileged_user(check)
    finally:
        shutil.rmtree(base)


def test_unusable_path_disables_the_tier(tmp_path):
    (tmp_path / "file").write_bytes(b"not a directory")
    t = tier(tmp_path / "file")
    assert t.stats.disabled and t.stats.errors == 1
    t.write(bid(1), block(1))
    assert t.read(bid(1)) is None


def test_write_failure_disables_the_tier(tmp_path, monkeypatch):
    t = tier(tmp_path)

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    t.write(bid(1), block(1))
    t.flush(10)
    assert t.stats.disabled and "No space left" in t.stats.disabled_reason and t.stats.errors == 1
    assert not t.contains(bid(1))
    t.close()


def test_clear_deletes_everything(tmp_path):
    t = written(tier(tmp_path), 1, 2, 3)
    t.clear()
    assert t.stats.blocks == 0 and t.stats.bytes == 0 and os.listdir(t.dir) == []
    written(t, 4)
    assert t.contains(bid(4))
    t.close()
