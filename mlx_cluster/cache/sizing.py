"""Tier sizes that fit the machine: `cache.ram_gb: auto` and `cache.ssd.max_gb: auto`.

A fixed default is wrong everywhere: 2 GB is a rounding error next to an H200's 141 GB or a
192 GB Mac, and 20 GB of SSD may be half a laptop's free disk. `auto` takes a share of what is
free when the rank starts, after its weights are loaded:

* RAM tier: 20% of the memory still available to this rank's device (the GPU's memory on CUDA,
  Metal's recommended working set on a Mac, available RAM otherwise), leaving the rest for the
  live KV cache and activations;
* SSD tier: 10% of the free space on the file system holding `cache.ssd.dir`, at most 200 GB.

Both are logged at start-up with the key that changes them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

GB = 1_000_000_000  # cache.ram_gb and cache.ssd.max_gb are decimal gigabytes
RAM_SHARE = 0.20
SSD_SHARE = 0.10
SSD_AUTO_CAP = 200 * GB


def available_memory() -> tuple[int, str]:
    """Bytes this rank's device can still use, and what they are."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    used = mx.get_active_memory()
    if "max_recommended_working_set_size" in info:  # Apple silicon: what Metal lets one process use
        return max(0, info["max_recommended_working_set_size"] - used), "Metal working set"
    if "total_memory" in info and mx.default_device() == mx.gpu:  # CUDA: the GPU's own memory
        return max(0, info["total_memory"] - used), "GPU memory"
    return _available_ram(), "available RAM"


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(directory: str | Path) -> int:
    """Free bytes on the file system that holds `directory` (its nearest existing parent)."""
    path = Path(directory).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ram_tier_bytes(ram_gb: float | str) -> int:
    if ram_gb != "auto":
        return int(float(ram_gb) * GB)
    free, what = available_memory()
    size = int(free * RAM_SHARE)
    log.info(
        "prefix cache RAM tier: %.1f GB (auto: %d%% of %.1f GB %s; set cache.ram_gb to change)",
        size / GB,
        RAM_SHARE * 100,
        free / GB,
        what,
    )
    return size


def ssd_tier_bytes(max_gb: float | str, directory: str | Path) -> int:
    if max_gb != "auto":
        return int(float(max_gb) * GB)
    free = free_disk(directory)
    size = min(int(free * SSD_SHARE), SSD_AUTO_CAP)
    log.info(
        "prefix cache SSD tier: %.1f GB under %s (auto: %d%% of %.1f GB free, at most %d GB; set cache.ssd.max_gb to change)",
        size / GB,
        directory,
        SSD_SHARE * 100,
        free / GB,
        SSD_AUTO_CAP // GB,
    )
    return size
