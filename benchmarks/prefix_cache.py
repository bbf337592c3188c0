"""Prefix-cache benchmark over HTTP: cold vs RAM hit vs SSD hit (after a restart), and the
prefill work of a 5-turn conversation with and without the cache.

    python benchmarks/prefix_cache.py --ranks 2 --system-tokens 2000 --out results/prefix.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Cluster  # noqa: E402  (the same harness the tests use)

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "an",
    "be",
    "this",
    "from",
    "or",
    "have",
    "not",
    "are",
]


def ttft(cluster: Cluster, messages: list[dict], max_tokens: int = 8) -> tuple[float, dict, str]:
    """Seconds to the first streamed token, the usage, and the full reply text."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    first, usage, text = None, {}, []
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text.append(c["delta"]["content"])
    return first, usage, "".join(text)


def system_prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--system-tokens", type=int, default=2000, help="approximate size of the shared system prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxc-prefix-"))
    cfg = {
        "scheduler": {"max_prompt_tokens": 4000, "prefill_chunk_tokens": 512},
        "cache": {"ram_gb": 1, "ssd": {"dir": str(work / "kv"), "policy": "write_through"}},
    }
    results: dict = {"ranks": args.ranks, "system_tokens_requested": args.system_tokens}

    cluster = Cluster(work / "a", ranks=args.ranks, config=cfg, name="prefix-bench").start()
    cold, ram = [], []
    try:
        # Multi-turn first (it clears the cache, RAM and SSD, between turns of the uncached run).
        def conversation(clear_each_turn: bool) -> tuple[int, int]:
            httpx.post(cluster.url + "/admin/cache/clear", timeout=120)
            messages = [{"role": "system", "content": system_prompt(300, seed=99)}]
            prompt_total = cached_total = 0
            for turn in range(args.turns):
                if clear_each_turn:
                    httpx.post(cluster.url + "/admin/cache/clear", timeout=120)
                messages.append({"role": "user", "content": f"turn {turn}: " + system_prompt(40, seed=turn)})
                _, usage, reply = ttft(cluster, messages, max_tokens=32)
                prompt_total += usage["prompt_tokens"]
                cached_total += usage["prompt_tokens_details"]["cached_tokens"]
                messages.append({"role": "assistant", "content": reply})
            return prompt_total, cached_total

        prompt_nc, cached_nc = conversation(clear_each_turn=True)
        prompt_c, cached_c = conversation(clear_each_turn=False)
        results["conversation"] = {
            "turns": args.turns,
            "prompt_tokens": prompt_c,
            "computed_with_cache": prompt_c - cached_c,
            "computed_without_cache": prompt_nc - cached_nc,
            "computed_fraction": (prompt_c - cached_c) / (prompt_nc - cached_nc),
        }
        for i in range(args.repeats):
            system = {"role": "system", "content": system_prompt(args.system_tokens, seed=i)}
            t, usage, _ = ttft(cluster, [system, {"role": "user", "content": f"question {i}"}])
            cold.append(t)
            results["prompt_tokens"] = usage["prompt_tokens"]
            t, usage, _ = ttft(cluster, [system, {"role": "user", "content": f"another question {i}"}])
            ram.append(t)
            results["ram_cached_tokens"] = usage["prompt_tokens_details"]["cached_tokens"]
    finally:
        cluster.stop()  # write-through: every block is on each rank's SSD already

    # Restart: a fresh cluster on the same SSD directory, RAM tier empty.
    cluster = Cluster(work / "b", ranks=args.ranks, config=cfg, name="prefix-bench-2").start()
    ssd = []
    try:
        for i in range(args.repeats):
            system = {"role": "system", "content": system_prompt(args.system_tokens, seed=i)}
            t, usage, _ = ttft(cluster, [system, {"role": "user", "content": f"third question {i}"}])
            ssd.append(t)
            results["ssd_cached_tokens"] = usage["prompt_tokens_details"]["cached_tokens"]
        stats = httpx.get(cluster.url + "/admin/cache", timeout=10).json()
        results["admin_cache_after_ssd_hits"] = stats
    finally:
        cluster.stop()
    shutil.rmtree(work, ignore_errors=True)
    results["ttft_s"] = {
        "cold": statistics.median(cold),
        "ram_hit": statistics.median(ram),
        "ssd_hit_after_restart": statistics.median(ssd),
    }
    results["ratios"] = {
        "ram_vs_cold": results["ttft_s"]["ram_hit"] / results["ttft_s"]["cold"],
        "ssd_vs_cold": results["ttft_s"]["ssd_hit_after_restart"] / results["ttft_s"]["cold"],
    }
    print(json.dumps({k: v for k, v in results.items() if k != "admin_cache_after_ssd_hits"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
