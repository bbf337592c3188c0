"""The prefix cache on a real two-rank cluster, over HTTP: cold, RAM hit and SSD hit (after a
restart) give token-identical greedy output; a worker whose SSD lost blocks still agrees with
rank 0 on what to restore; concurrent requests share a prefix."""

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.cluster import Cluster

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 40}


def ask(cluster, question, max_tokens=24):
    r = cluster.post(
        "/v1/chat/completions",
        {
            "messages": [SYSTEM, {"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]


def test_cold_ram_and_ssd_hits_match_on_two_ranks(tmp_path, models_dir):
    kv = tmp_path / "kv"
    cfg = {"cache": {"ssd": {"dir": str(kv), "policy": "write_through"}}}
    with Cluster(tmp_path / "a", ranks=2, models_dir=models_dir, config=cfg) as cluster:
        cold, usage = ask(cluster, "What is a cluster?")
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        warm, usage = ask(cluster, "What is a cluster?")
        assert warm == cold
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16
        # Concurrent requests sharing the system prompt all hit it and keep their own answers.
        questions = [f"Question number {i}?" for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda q: ask(cluster, q), questions))
        assert all(u["prompt_tokens_details"]["cached_tokens"] > 0 for _, u in together)
        stats = httpx.get(cluster.url + "/admin/cache", timeout=10).json()
        assert stats["ram"]["hits"] > 0
    rank_dirs = sorted(kv.glob("*/tp2/rank*"))
    assert [d.name for d in rank_dirs] == ["rank0", "rank1"]
    assert all(list(d.glob("*.safetensors")) for d in rank_dirs)

    with Cluster(tmp_path / "b", ranks=2, models_dir=models_dir, config=cfg) as cluster:
        from_ssd, usage = ask(cluster, "What is a cluster?")
        assert from_ssd == cold
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0

    # Rank 1 loses half its blocks (a wiped or failing disk): the ranks agree on less, the
    # output stays identical, and the reported cached count is the truth.
    files = sorted(rank_dirs[1].glob("*.safetensors"))
    for f in files[::2]:
        f.unlink()
    files[1].write_bytes(b"garbage")
    with Cluster(tmp_path / "c", ranks=2, models_dir=models_dir, config=cfg) as cluster:
        partial, usage = ask(cluster, "What is a cluster?")
        assert partial == cold
        again, usage2 = ask(cluster, "What is a cluster?")
        assert again == cold
        assert usage2["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens_details"]["cached_tokens"]


def test_other_tp_size_gets_no_hits(tmp_path, models_dir):
    kv = tmp_path / "kv"
    cfg = {"cache": {"ssd": {"dir": str(kv), "policy": "write_through"}}}
    with Cluster(tmp_path / "a", ranks=2, models_dir=models_dir, config=cfg) as cluster:
        two, _ = ask(cluster, "Isolation?")
    with Cluster(tmp_path / "b", ranks=1, models_dir=models_dir, config=cfg) as cluster:
        one, usage = ask(cluster, "Isolation?")
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert one == two
    assert sorted(p.name for p in next(kv.iterdir()).iterdir()) == ["tp1", "tp2"]
    shutil.rmtree(kv)
    assert not Path(kv).exists()
