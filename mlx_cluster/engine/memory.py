"""Give memory the engine no longer uses back to the OS once the batch has gone idle.

A rank's RSS drifted up with the requests it served (soak, docs/operations.md) while nothing
live grew: no Python object type, no MLX active memory. Two pools keep freed memory:

* MLX's buffer cache (`mx.get_cache_memory()`, up to 32 MB by default on the CPU backend):
  mlx-lm clears it after each prefill chunk but only every 512 decode steps, so an idle rank
  holds whatever the last decode steps left there (12 MB measured on builtin:tiny).
* glibc's malloc arenas: on the CPU backend every MLX array is a malloc, of sizes that vary with
  each prompt, and freed chunks in the middle of an arena stay resident (only the arena's top is
  returned, and glibc's mmap threshold rises after large frees, moving more into the arenas).
  `malloc_trim(0)` hands the free pages of every arena back (8 to 13 MB measured per rank).

Large frees are also kept from fragmenting the arenas in the first place: `fix_mmap_threshold()`
(every rank, at start) pins glibc's mmap threshold at its 128 KB default, so larger blocks (most
MLX arrays: KV, logits) are mapped and unmapped whole instead of being carved from an arena once
the threshold has crept up after the model load freed big buffers (glibc raises it to the size
of each large block freed, up to 32 MB). MLX's own buffer cache still recycles them between
steps. MALLOC_MMAP_THRESHOLD_ in the rank's environment (`cluster.env`) overrides it.

So when a step's plan says the batch is idle after work, every rank clears MLX's cache and trims
the heap: at most once per `min_interval_s`, never while a sequence runs (a new request pays for
its buffers again, which on the CPU backend is what every step already does). Neither changes
any result. Where `malloc_trim` does not exist (macOS, musl), only MLX's cache is cleared.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _libc_function(name: str):
    """A function of the C library, or None where it has none (malloc_trim and mallopt are glibc's)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's default, kept fixed


def fix_mmap_threshold(environ=None) -> bool:
    """Pin glibc's mmap threshold (see the module docstring); False where there is no glibc
    or the environment already sets MALLOC_MMAP_THRESHOLD_ (glibc then read it at start)."""
    environ = os.environ if environ is None else environ
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def _clear_mlx_cache() -> None:
    import mlx.core as mx

    mx.clear_cache()


def rss_kb() -> int:
    """This process's resident set size in KB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (_page_size() // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


class IdleReclaimer:
    """Called after every engine step with whether the batch is idle; reclaims once per idle spell."""

    def __init__(
        self,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[int], int] | None | bool = True,
        clear_cache: Callable[[], None] = _clear_mlx_cache,
    ):
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._trim = _libc_trim() if trim is True else (trim or None)
        self._clear_cache = clear_cache
        self._busy = False  # some step ran work since the last reclaim
        self._last = -float("inf")
        self.reclaims = 0

    def after_step(self, idle: bool) -> bool:
        """Reclaim when the batch is idle after work, unless the last reclaim was too recent (the
        next idle heartbeat plan tries again). True when it reclaimed."""
        if not idle:
            self._busy = True
            return False
        if not self._busy or self.clock() - self._last < self.min_interval_s:
            return False
        self.reclaim()
        return True

    def reclaim(self) -> None:
        before = rss_kb()
        started = time.perf_counter()
        self._clear_cache()
        if self._trim is not None:
            self._trim(0)
        self._busy = False
        self._last = self.clock()
        self.reclaims += 1
        log.debug("idle: released %d KB in %.1f ms", max(0, before - rss_kb()), (time.perf_counter() - started) * 1e3)
