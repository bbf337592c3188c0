"""Measure the prefix cache on builtin:tiny at engine level (no HTTP):

* prefill time (TTFT) of a request whose ~2000-token prefix is cold, in RAM, or on SSD,
* SSD tier read throughput,
* the fraction of prompt tokens prefilled over a 5-turn chat, with and without the cache.

    python -m mlx_cluster.cache.bench [--workdir DIR] [--prefix 2000] [--trials 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from mlx_cluster.cache.testing import cache_config, generate, load_tiny, make_executor, random_prompt


def drop_page_cache(directory: Path) -> None:
    """Ask the kernel to forget our block files' pages (only ours), so reads hit the disk."""
    for entry in os.scandir(directory):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ttft(loaded, workdir: Path, prefix_len: int, trials: int) -> dict[str, list[float]]:
    ex = make_executor(loaded, cache_config(workdir / "kv", ssd={"policy": "write_through"}))
    cache = ex.prefix_cache
    generate(ex, [random_prompt(64, seed=999)], 1)  # compile and allocate once
    times: dict[str, list[float]] = {"cold": [], "ram": [], "ssd (page cache)": [], "ssd (disk)": []}
    for t in range(trials):
        prefix = random_prompt(prefix_len, seed=1000 + t)
        for i, kind in enumerate(times):
            if kind.startswith("ssd"):
                cache.ssd.flush(60)
                cache.ram.clear()  # the hit must come from the SSD tier
            if kind == "ssd (disk)":
                drop_page_cache(cache.ssd.dir)
            # A new 16-token suffix each time: the prefix is shared, the question is not.
            [r] = generate(ex, [prefix + random_prompt(16, seed=100 * t + i)], 1)
            times[kind].append(r.ttft_s)
            print(f"  trial {t} {kind:17s} ttft {r.ttft_s:7.3f} s  cached {r.cached_tokens}", flush=True)
    s = cache.stats().ssd
    print(
        f"SSD reads: {s.read_bytes / 1e6:.1f} MB in {s.read_s:.3f} s = {s.read_bytes / 1e6 / s.read_s:.0f} MB/s (verified)"
    )
    cache.close()
    return times


def ssd_throughput(workdir: Path, block_shape: tuple[int, ...], dtype, n_blocks: int) -> tuple[float, float]:
    """MB/s of verified SSD-tier reads of `n_blocks` synthetic blocks: (page cache, after dropping it)."""
    import time

    import mlx.core as mx

    from mlx_cluster.cache.blocks import Block
    from mlx_cluster.cache.hashing import Namespace
    from mlx_cluster.cache.ssd import SsdTier

    ns = Namespace("bench", 1, str(dtype), None, 64, block_shape[2])
    tier = SsdTier(
        workdir,
        fingerprint="bench",
        tp_size=1,
        rank=0,
        metadata=ns.fields(),
        max_bytes=10**12,
        ttl_s=3600,
        max_pending_writes=n_blocks,
    )
    k = mx.random.normal(block_shape).astype(dtype)
    mx.eval(k)
    ids = [i.to_bytes(16, "big") for i in range(n_blocks)]
    for i in ids:
        tier.write(i, Block({"k": k, "v": k}, block_shape[2], 2 * k.nbytes))
    tier.flush(600)
    rates = []
    for drop in (False, True):
        if drop:
            drop_page_cache(tier.dir)
        t0, b0 = time.perf_counter(), tier.stats.read_bytes
        for i in ids:
            assert tier.read(i) is not None
        rates.append((tier.stats.read_bytes - b0) / 1e6 / (time.perf_counter() - t0))
    tier.clear()
    tier.close()
    return rates[0], rates[1]


def conversation(loaded, workdir: Path | None, turns: int = 5, reply_tokens: int = 32) -> tuple[int, int]:
    """(prompt tokens, prompt tokens actually prefilled) over a chat where each turn resends the history."""
    cfg = cache_config(workdir) if workdir is not None else None
    ex = make_executor(loaded, cfg if workdir is not None else None)
    tok = loaded.tokenizer
    corpus = (Path(__file__).parent.parent / "models" / "corpus" / "conversations.txt").read_text().split("\n")
    corpus = [line for line in corpus if len(line) > 40]
    messages = [{"role": "system", "content": " ".join(corpus[:12])}]
    total = 0
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(corpus[20 + 3 * turn : 23 + 3 * turn])})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
        before = ex.stats.prompt_tokens
        [r] = generate(ex, [prompt], reply_tokens)
        total += len(prompt)
        print(
            f"  turn {turn}: prompt {len(prompt)} tokens, cached {r.cached_tokens}, "
            f"prefilled {ex.stats.prompt_tokens - before}",
            flush=True,
        )
        messages.append({"role": "assistant", "content": tok.decode(r.tokens)})
    computed = ex.stats.prompt_tokens
    if ex.prefix_cache is not None:
        ex.prefix_cache.close()
    return total, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kv-bench-"))
    loaded = load_tiny(workdir / "models")
    print(f"TTFT with a {args.prefix}-token shared prefix (+16 new tokens), builtin:tiny:")
    times = ttft(loaded, workdir, args.prefix, args.trials)
    for kind, ts in times.items():
        print(f"  {kind:17s} median {statistics.median(ts):.3f} s")
    import mlx.core as mx

    for label, shape, dtype in (
        ("builtin:tiny block (4 layers x 4 heads x 16 x 32, fp32; 64 KiB)", (4, 4, 16, 32), mx.float32),
        ("8B-like block (32 layers x 8 heads x 16 x 128, bf16; 2 MiB)", (32, 8, 16, 128), mx.bfloat16),
    ):
        warm, cold = ssd_throughput(workdir / "kv-throughput", shape, dtype, 200 if shape[0] == 4 else 64)
        print(f"SSD tier reads, {label}: {warm:.0f} MB/s from page cache, {cold:.0f} MB/s after dropping it")
    print("5-turn conversation:")
    for label, wd in (("without cache", None), ("with cache", workdir / "kv-chat")):
        total, computed = conversation(loaded, wd)
        print(f"  {label}: prefilled {computed} of {total} prompt tokens ({computed / total:.1%})")


if __name__ == "__main__":
    main()
