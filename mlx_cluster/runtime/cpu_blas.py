"""An optimized BLAS under mlx's CPU backend on Linux (`cluster.cpu_blas`).

mlx's Linux CPU wheel does every float matmul through `cblas_sgemm`, and the BLAS it bundles
(`mlx_cpu.libs/libblas-*.so.3.10`) is the netlib reference implementation: plain loops, no SIMD
blocking, one thread. On the built-in `tiny` model that makes a width-5 forward cost 3.8 plain
ones and every step compute-bound (docs/benchmarks.md, "An optimized BLAS on Linux CPUs").

A shared library loaded with RTLD_GLOBAL joins the process's global symbol scope, which the
dynamic linker searches before a library's own dependencies. So loading OpenBLAS that way
*before mlx is first imported* makes libmlx's `cblas_sgemm` resolve to OpenBLAS, with no
LD_PRELOAD and no change to the installed wheel. After mlx is imported it is too late: the
symbol is already bound, so `use_cpu_blas` refuses to run then.

Settings: `auto` (the default) loads the system's OpenBLAS when there is one, on Linux only
(macOS wheels use Accelerate already) and otherwise keeps the bundled BLAS; `bundled` never
loads anything; a path loads that library and fails start-up if it cannot. Threads: the
OPENBLAS_NUM_THREADS in the environment (cluster.env), else this host's cores shared between
its ranks, since mlx's CPU backend itself runs each op on one thread.

Every process that compares tokens with a served rank (the test suite, in-process benchmarks)
calls this too, so both sides multiply with the same library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys

log = logging.getLogger("mlx_cluster.cpu_blas")

# Where Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial), Fedora and Homebrew-on-Linux put it.
SEARCH = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-*/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/home/linuxbrew/.linuxbrew/lib/libopenblas.so.0",
)
HINT = "apt-get install libopenblas0-pthread (Debian/Ubuntu) or dnf install openblas (Fedora)"

_loaded: str | None = None  # what this process runs on, once decided


def find_openblas() -> str | None:
    """The system's OpenBLAS, or None."""
    for pattern in SEARCH:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    name = ctypes.util.find_library("openblas")
    return name or None


def default_threads(local_ranks: int) -> int:
    """This host's cores shared between its ranks (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_ranks))


def use_cpu_blas_from_env(environ=os.environ) -> str:
    """use_cpu_blas with what the launcher put in a rank's environment (launcher/placement.py);
    in-process benchmarks call it too, so that they multiply as a served rank does."""
    return use_cpu_blas(environ.get("MLX_CLUSTER_CPU_BLAS", "auto"), int(environ.get("MLX_CLUSTER_LOCAL_RANKS", "1")))


def use_cpu_blas(setting: str = "auto", local_ranks: int = 1) -> str:
    """Load the BLAS that `setting` names for mlx's CPU matmuls; returns a line for the log.

    Raises RuntimeError when a path was asked for and cannot serve (not loadable, no
    cblas_sgemm), or when mlx is already imported (nothing would change, silently)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if setting == "bundled" or (setting == "auto" and not sys.platform.startswith("linux")):
        _loaded = "CPU matmuls: mlx's own BLAS"
        return _loaded
    if "mlx.core" in sys.modules:
        raise RuntimeError("cluster.cpu_blas must be applied before mlx is imported (it rebinds cblas_sgemm)")
    path = find_openblas() if setting == "auto" else os.path.expanduser(setting)
    if path is None:
        _loaded = f"CPU matmuls: mlx's bundled reference BLAS (slow; for a faster CPU: {HINT})"
        return _loaded
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cblas_sgemm  # noqa: B018  (raises AttributeError when the library lacks it)
    except (OSError, AttributeError) as e:
        if setting == "auto":  # a broken system library must not stop a server that runs without it
            _loaded = f"CPU matmuls: mlx's bundled BLAS ({path} unusable: {e})"
            return _loaded
        raise RuntimeError(
            f"cluster.cpu_blas: {path!r} is not a usable BLAS ({e}); name a library with cblas_sgemm "
            f"(OpenBLAS: {HINT}), or write auto or bundled"
        ) from None
    threads = os.environ.get("OPENBLAS_NUM_THREADS")
    n = int(threads) if threads and threads.isdigit() else default_threads(local_ranks)
    if hasattr(lib, "openblas_set_num_threads"):
        lib.openblas_set_num_threads(n)
    _loaded = f"CPU matmuls: {path} ({n} thread{'s' if n != 1 else ''})"
    return _loaded
