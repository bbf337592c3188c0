"""What a prefix-cache hit is worth on this machine: restore only what is cheaper than recompute.

A restored block saves prefilling `block_size` tokens and costs getting its KV into the batch:
from the RAM tier a copy on the device; from the SSD tier a read and a checksum first. Which is
cheaper depends on the machine, measured here, not assumed: an H200 prefills an 8B model at ~30k
tokens/s, so re-reading 2 MB of KV per 16 tokens from disk loses to recomputing it, while a Mac
prefilling ~1k tokens/s wins big from the same read (numbers in docs/benchmarks.md).

Each rank measures, online:
* `prefill`: seconds per prompt token at the margin, from every prefill the batcher runs alone
  (decode.py), fitted as a line (`PrefillFit`): a restore shortens a prefill, it does not
  remove it, so the fixed cost of a forward (~10 ms of host work on a GPU, whatever the token
  count) is paid either way and must not be charged to the restored tokens,
* `copy`: seconds per byte to turn an in-memory block into KV on the device (calibrated at start),
* `upload`: seconds per byte to turn a block read from SSD (host bytes) into KV on the device
  (calibrated at start): a memcpy on a Mac's unified memory, a host-to-device transfer on a
  discrete GPU, where it can cost more than recomputing the block,
* the SSD tier's read cost: seconds per byte to read and verify a file (ssd.py, every read).

Rank 0 plans with its own figures: restores use only blocks already in memory, and a queued
request is held for its SSD prefetch only while the reads still pending are expected to take
less time than prefilling those blocks would (`worth_waiting`). Until a figure has been
measured, the rule is to restore (as before this model existed).
"""

from __future__ import annotations

from dataclasses import dataclass


class Ewma:
    """An exponentially weighted mean of samples (None until the first one)."""

    def __init__(self, alpha: float = 0.2, value: float | None = None):
        self.alpha = alpha
        self.value = value
        self.samples = 0

    def add(self, x: float) -> None:
        self.samples += 1
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class PrefillFit:
    """Prefill time as fixed + per_token x tokens, fitted online; `value` is per_token, the
    marginal cost.

    Why a line and not seconds / tokens: after a restore only the prompt's tail is prefilled,
    often one block. On an H200 with the 8b preset such short prefills, nearly all fixed host
    cost, made the ratio 0.88 ms per token, about six times the margin of the same server's
    cold prompts (~0.14 ms): SSD reads then looked far cheaper than recomputing and slowed every
    warm request (measured: 1.92x TTFT).

    Samples go to buckets by size (powers of two), each an exponentially weighted mean of its
    tokens and seconds, and the line is fitted through the buckets' means. Buckets keep the
    spread of sizes: a server whose warm requests only prefill one-block tails for hours still
    remembers what its long prefills cost (one decaying fit over all samples would forget them
    and drift back to the ratio). With one bucket only, or a slope that noise made
    non-positive, `value` is the ratio of the means.
    """

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.samples = 0
        self._buckets: dict[int, tuple[Ewma, Ewma]] = {}  # log2(tokens) -> (tokens, seconds) means

    def add(self, tokens: int, seconds: float) -> None:
        x, y = self._buckets.setdefault(tokens.bit_length(), (Ewma(self.alpha), Ewma(self.alpha)))
        x.add(tokens)
        y.add(seconds)
        self.samples += 1

    def _fit(self) -> tuple[float, float] | None:
        """(per_token, fixed_s) through the buckets' means (None until the first sample)."""
        points = [(x.value, y.value) for x, y in self._buckets.values()]
        if not points:
            return None
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var = sum((x - mean_x) ** 2 for x, _ in points)
        if n > 1 and var > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
            if slope > 0:
                return slope, max(0.0, mean_y - slope * mean_x)
        return mean_y / mean_x, 0.0

    @property
    def value(self) -> float | None:
        """Seconds per prompt token at the margin (None until the first sample)."""
        fit = self._fit()
        return None if fit is None else fit[0]

    @property
    def fixed_s(self) -> float | None:
        """The fitted cost of a prefill of no tokens (what a restore cannot save)."""
        fit = self._fit()
        return None if fit is None else fit[1]


UNMEASURED_WAIT_S = 1.0  # how long a request may wait for a prefetch before any cost is known


@dataclass
class RestoreDecision:
    blocks: int  # leading blocks to restore now (all already in memory)
    wait_s: float  # how long the request may still be held for blocks being read (0: do not wait)
    reading: int = 0  # blocks of the chain still being read on this rank


class CostModel:
    """Per-rank cost figures and the decisions rank 0 takes with them."""

    def __init__(self, block_size: int, block_bytes: int = 0):
        self.block_size = block_size
        self.block_bytes = block_bytes  # bytes of one block on this rank (set once the shapes are known)
        self.prefill = PrefillFit()  # seconds per prompt token, at the margin
        self.copy = Ewma()  # seconds per byte, memory -> KV on the device
        self.upload = Ewma()  # seconds per byte, host bytes (an SSD read) -> KV on the device
        self.ssd_read = None  # the SSD tier's Ewma (seconds per byte), when it has one

    # ---- measurements ------------------------------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill of `tokens` prompt tokens took `seconds` (small ones pin the fixed cost)."""
        if tokens > 0 and seconds > 0:
            self.prefill.add(tokens, seconds)

    # ---- figures -----------------------------------------------------------------------
    def prefill_block_s(self) -> float | None:
        p = self.prefill.value
        return None if p is None else p * self.block_size

    def memory_block_s(self) -> float:
        """Restoring one block already in memory."""
        c = self.copy.value
        return 0.0 if c is None else c * self.block_bytes

    def upload_block_s(self, nbytes: int | None = None) -> float:
        """Restoring one block read from SSD (in host memory); the device copy until measured."""
        u = self.upload.value
        return self.memory_block_s() if u is None else u * (nbytes if nbytes is not None else self.block_bytes)

    def read_block_s(self, nbytes: int | None = None) -> float | None:
        """Reading and verifying one block's file from the SSD tier (None until measured)."""
        r = self.ssd_read.value if self.ssd_read is not None else None
        return None if r is None else r * (nbytes if nbytes is not None else self.block_bytes)

    # ---- decisions ---------------------------------------------------------------------
    def reads_pay(self) -> bool | None:
        """Whether reading a block from SSD beats prefilling it (None: not measured yet)."""
        prefill, read = self.prefill_block_s(), self.read_block_s()
        if prefill is None or read is None:
            return None
        return read + self.upload_block_s() < prefill

    def plan(self, where: list[str], sizes: list[int] | None = None) -> RestoreDecision:
        """Given where each leading block of a prompt is on this rank ("memory": RAM tier, on the
        device; "staged": read from SSD into host memory; "reading": prefetch in flight), how many
        to restore now and how long the request may wait for the reads.

        Blocks on the device are restored when one costs less than prefilling it; staged blocks
        when uploading one does too. The blocks behind them that are still being read are never
        waited for inside a step; the request waits (outside any step, others keep running) only
        while reading them is expected to beat prefilling them, and at most for the prefill time
        they would save.
        """
        prefill = self.prefill_block_s()
        restore = self.memory_block_s()
        if prefill is not None and restore >= prefill:
            return RestoreDecision(0, 0.0)  # even memory hits lose to recomputing here
        sizes = sizes or [self.block_bytes] * len(where)
        uploads = [self.upload_block_s(b) for b in sizes]
        n = 0
        while n < len(where) and (
            where[n] == "memory" or (where[n] == "staged" and (prefill is None or uploads[n] < prefill))
        ):
            n += 1
        behind = len(where) - n  # blocks a wait could add (some may already be in memory)
        if not behind or where[n] == "staged":  # a staged block that loses: so would the rest
            return RestoreDecision(n, 0.0)
        reads = [self.read_block_s(b) for b, w in zip(sizes[n:], where[n:]) if w == "reading"]
        if prefill is None or any(r is None for r in reads):
            return RestoreDecision(n, UNMEASURED_WAIT_S, len(reads))  # nothing to weigh yet: presume the tier helps
        saved = sum(prefill - (restore if w == "memory" else u) for w, u in zip(where[n:], uploads[n:]))
        return RestoreDecision(n, saved if sum(reads) < saved else 0.0, len(reads))

    def to_dict(self) -> dict:
        return {
            "prefill_s_per_token": self.prefill.value,
            "prefill_samples": self.prefill.samples,
            "prefill_fixed_s": self.prefill.fixed_s,
            "copy_s_per_byte": self.copy.value,
            "upload_s_per_byte": self.upload.value,
            "ssd_read_s_per_byte": self.ssd_read.value if self.ssd_read is not None else None,
            "ssd_read_samples": self.ssd_read.samples if self.ssd_read is not None else 0,
            "block_bytes": self.block_bytes,
            "prefill_block_s": self.prefill_block_s(),
            "memory_block_s": self.memory_block_s(),
            "staged_block_s": self.upload_block_s(),
            "ssd_block_s": self.read_block_s(),
        }
