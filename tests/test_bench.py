"""Tests of `mlx-cluster bench` against a tiny fake OpenAI-compatible streaming server.

The fake server (FastAPI + uvicorn in a background thread on a free 127.0.0.1 port) streams
one chunk per token with a small sleep, sends the usage chunk when asked to, lists one model,
models a prefix cache (cached_tokens = longest word prefix shared with an earlier prompt) and
can be told to fail every n-th request with an HTTP 500 or an in-stream error chunk.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mlx_cluster.bench.cli import api_base, resolve_api_key
from mlx_cluster.bench.loadgen import RequestResult, Target
from mlx_cluster.bench.progress import Progress
from mlx_cluster.bench.report import format_table, percentile, stats_ms, summarize
from mlx_cluster.bench.sse import DONE, chunk_error, chunk_text, sse_data
from mlx_cluster.bench.workload import WORDS, make_prompts
from mlx_cluster.cli import build_parser

# ---------------------------------------------------------------------------------------------
# Fake server


class FakeState:
    """What the fake server does, and what it received. Reset before every test."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict] = []  # {"endpoint", "body", "auth"} in arrival order
        self.seen: list[list[str]] = []  # prompts so far, as word lists (the "prefix cache")
        self.fail_every = 0  # fail every n-th request (counting from 1); 0 = never
        self.fail_mode = "http"  # "http": 500 response; "chunk": error chunk mid-stream
        self.send_usage = True
        self.token_delay = 0.002


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def handle(request: Request, endpoint: str):
        body = await request.json()
        state.requests.append({"endpoint": endpoint, "body": body, "auth": request.headers.get("authorization")})
        n = len(state.requests)
        prompt = body["messages"][-1]["content"] if endpoint == "chat" else body["prompt"]
        words = prompt.split()
        cached = max((_common_prefix(words, w) for w in state.seen), default=0)
        state.seen.append(words)
        fail = bool(state.fail_every) and n % state.fail_every == 0
        if fail and state.fail_mode == "http":
            return JSONResponse({"error": {"message": f"injected failure {n}"}}, status_code=500)
        # ignore_eos: exactly max_tokens; otherwise the "model" stops early at 3 tokens.
        num_tokens = body["max_tokens"] if body.get("ignore_eos") else min(3, body["max_tokens"])
        usage_wanted = (body.get("stream_options") or {}).get("include_usage") and state.send_usage
        delay = state.token_delay

        async def events():
            if endpoint == "chat":
                # Role-only first chunk, without the optional space after "data:": not a token.
                yield "data:" + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                yield "\n\n: keep-alive comment\n\n"
            for i in range(num_tokens):
                await asyncio.sleep(delay)
                if fail and i == 2:
                    yield _sse({"error": {"message": f"injected stream failure {n}", "code": 500}})
                    yield f"data: {DONE}\n\n"
                    return
                if endpoint == "chat":
                    yield _sse({"choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}]})
                else:
                    yield _sse({"choices": [{"index": 0, "text": f" tok{i}", "finish_reason": None}]})
            if usage_wanted:
                usage = {
                    "prompt_tokens": len(words),
                    "completion_tokens": num_tokens,
                    "total_tokens": len(words) + num_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached},
                }
                yield _sse({"choices": [], "usage": usage})
            yield f"data: {DONE}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions")

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a pre-bound socket: no race for a "free" port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(fake_server):
    url, state = fake_server
    state.reset()
    return url, state


def bench(url: str, *options: str) -> int:
    """Run `mlx-cluster bench URL --no-progress OPTIONS` through the real CLI parser."""
    args = build_parser().parse_args(["bench", url, "--no-progress", *options])
    return args.func(args)


def bench_json(capsys, url: str, *options: str) -> tuple[int, dict]:
    code = bench(url, "--json", *options)
    return code, json.loads(capsys.readouterr().out)


SMALL = ("--num-requests", "8", "--concurrency", "3", "--input-len", "16", "--output-len", "6")


def assert_ordered(stats: dict) -> None:
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    assert stats["mean"] > 0


# ---------------------------------------------------------------------------------------------
# Helpers


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([4, 1, 3, 2], 50) == 2.5  # sorts first
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # numpy.percentile's value
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert stats_ms([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98)}
    assert stats_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_sse_parsing():
    assert sse_data('data: {"a": 1}\n') == '{"a": 1}'
    assert sse_data('data:{"a": 1}\r\n') == '{"a": 1}'
    assert sse_data("data: [DONE]") == DONE
    assert sse_data("") is None
    assert sse_data(": keep-alive") is None
    assert sse_data("event: message") is None

    chat = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    assert chunk_text(chat, "chat") == "hi"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, "chat") == ""
    assert chunk_text({"choices": [{"delta": {"reasoning_content": "hmm"}}]}, "chat") == "hmm"
    assert chunk_text({"choices": [], "usage": {"prompt_tokens": 3}}, "chat") == ""
    assert chunk_text({"choices": [{"text": "x"}]}, "completions") == "x"
    assert chunk_text({"choices": [{"text": "x"}]}, "chat") == ""

    assert chunk_error({"error": {"message": "boom"}}) == "boom"
    assert chunk_error({"error": "bad"}) == "bad"
    assert chunk_error(chat) is None


def test_api_base_and_api_key(monkeypatch):
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/", "h:8000"):
        assert api_base(url) == "http://h:8000/v1"
    monkeypatch.delenv("MLX_CLUSTER_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv("OPENAI_API_KEY", "openai")
    assert resolve_api_key(None) == "openai"
    monkeypatch.setenv("MLX_CLUSTER_API_KEY", "mine")
    assert resolve_api_key(None) == "mine"
    assert resolve_api_key("explicit") == "explicit"


def test_request_body():
    body = Target("http://h/v1", "m", "chat", output_len=7).body("hello")
    assert body["messages"] == [{"role": "user", "content": "hello"}] and "prompt" not in body
    assert body["max_tokens"] == 7 and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    body = Target("http://h/v1", "m", "completions", ignore_eos=False).body("hello")
    assert body["prompt"] == "hello" and "messages" not in body and "ignore_eos" not in body


def test_workload_is_deterministic():
    a = make_prompts("random", 5, 20, seed=7)
    assert a == make_prompts("random", 5, 20, seed=7)
    assert a != make_prompts("random", 5, 20, seed=8)
    assert len(set(a)) == 5
    assert all(len(p.split()) == 20 and set(p.split()) <= set(WORDS) for p in a)
    # More prompts extend the list without changing the first ones (warmup comes from the end).
    assert make_prompts("random", 8, 20, seed=7)[:5] == a


def test_shared_prefix_workload():
    prompts = make_prompts("shared-prefix", 6, 10, prefix_len=30, seed=3)
    split = [p.split() for p in prompts]
    assert all(len(w) == 40 for w in split)
    assert all(w[:30] == split[0][:30] for w in split)
    assert len({tuple(w[30:]) for w in split}) == 6  # suffixes differ
    assert make_prompts("shared-prefix", 6, 10, prefix_len=30, seed=4)[0].split()[:30] != split[0][:30]
    # The random workload ignores prefix_len.
    assert all(len(p.split()) == 10 for p in make_prompts("random", 3, 10, prefix_len=30))
    with pytest.raises(ValueError):
        make_prompts("nope", 1, 1)


def test_summarize_counts_and_ratios():
    ok = RequestResult(success=True, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4, content_chunks=5)
    ok.completion_tokens, ok.prompt_tokens, ok.cached_tokens = 5, 100, 40
    ok2 = RequestResult(success=True, ttft_s=0.2, e2e_s=0.4, itl_s=[0.2], content_chunks=2)
    ok2.completion_tokens, ok2.prompt_tokens, ok2.cached_tokens = 2, 100, None
    bad = RequestResult(success=False, error="HTTP 500: x", e2e_s=0.01)
    assert ok.tpot_s == pytest.approx(0.1) and ok2.tpot_s == pytest.approx(0.2)
    assert RequestResult(success=True, ttft_s=0.1, e2e_s=0.2, content_chunks=1).tpot_s is None

    r = summarize([ok, ok2, bad], 2.0, [bad], {"model": "m"})
    assert r["model"] == "m" and r["completed"] == 2 and r["errors"] == 1 and r["warmup_errors"] == 1
    assert r["error_samples"] == ["HTTP 500: x"]  # distinct messages only
    assert r["request_throughput_req_s"] == 1.0 and r["output_throughput_tok_s"] == 3.5
    assert r["total_token_throughput_tok_s"] == 103.5 and r["mean_prompt_tokens"] == 100
    assert r["cached_token_ratio"] == pytest.approx(0.2) and r["total_cached_tokens"] == 40
    assert r["ttft_ms"]["mean"] == pytest.approx(150) and r["e2e_ms"]["p50"] == pytest.approx(450)
    json.dumps(r, allow_nan=False)  # strictly valid JSON

    empty = summarize([bad], 1.0)
    assert empty["completed"] == 0 and empty["ttft_ms"]["mean"] is None and empty["cached_token_ratio"] is None
    assert "n/a" in format_table(empty)


def test_progress_line():
    out = io.StringIO()
    p = Progress("bench", 2, stream=out, enabled=True)
    p.update(True)
    p.update(False)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r") and "2/2" in text and "errors 1" in text and text.endswith("\n")
    quiet = io.StringIO()  # not a TTY: draws nothing by default
    Progress("bench", 2, stream=quiet).update(True)
    assert quiet.getvalue() == ""


def test_import_is_cheap():
    code = "import sys, mlx_cluster.cli, mlx_cluster.bench.cli; print(sorted(m for m in ('mlx', 'httpx', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_invalid_options_are_rejected():
    for bad in (["--concurrency", "0"], ["--num-requests", "-1"], ["--request-rate", "0"], ["--endpoint", "x"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["bench", "http://127.0.0.1:1", *bad])
        assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# End to end against the fake server


def test_chat_benchmark_json(fake, capsys):
    url, state = fake
    code, r = bench_json(capsys, url, *SMALL, "--api-key", "secret")
    assert code == 0
    assert r["model"] == "fake-model"  # discovered from /v1/models
    assert r["completed"] == 8 and r["errors"] == 0 and r["error_samples"] == []
    assert r["num_requests"] == 8 and r["concurrency"] == 3 and r["request_rate"] is None
    assert len(state.requests) == 8 + 2  # default warmup 2, not counted
    assert r["total_output_tokens"] == 8 * 6 and r["mean_output_tokens"] == 6
    assert r["mean_prompt_tokens"] == 16  # the fake counts one token per word
    assert r["duration_s"] > 0
    assert r["output_throughput_tok_s"] == pytest.approx(48 / r["duration_s"])
    assert r["request_throughput_req_s"] == pytest.approx(8 / r["duration_s"])
    assert r["total_token_throughput_tok_s"] == pytest.approx((48 + 8 * 16) / r["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert_ordered(r[key])
    assert r["ttft_ms"]["mean"] < r["e2e_ms"]["mean"] and r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
    assert r["tpot_ms"]["mean"] >= 1.0  # the fake sleeps 2 ms per token
    assert 0 <= r["cached_token_ratio"] < 0.5  # random prompts barely overlap
    body = state.requests[-1]["body"]
    assert state.requests[-1]["endpoint"] == "chat" and state.requests[-1]["auth"] == "Bearer secret"
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 6 and body["model"] == "fake-model"


def test_completions_endpoint_and_v1_url(fake, capsys, monkeypatch):
    url, state = fake
    monkeypatch.setenv("MLX_CLUSTER_API_KEY", "from-env")
    code, r = bench_json(capsys, url + "/v1/", *SMALL, "--endpoint", "completions", "--model", "m", "--warmup", "0")
    assert code == 0 and r["completed"] == 8 and r["total_output_tokens"] == 48 and r["model"] == "m"
    assert {q["endpoint"] for q in state.requests} == {"completions"}
    assert all(len(q["body"]["prompt"].split()) == 16 and q["auth"] == "Bearer from-env" for q in state.requests)


def test_shared_prefix_hits_the_cache(fake, capsys):
    url, state = fake
    code, r = bench_json(
        capsys, url, *SMALL, "--workload", "shared-prefix", "--prefix-len", "64", "--warmup", "1", "--seed", "5"
    )
    assert code == 0 and r["workload"] == "shared-prefix" and r["prefix_len"] == 64
    prompts = [q["body"]["messages"][0]["content"].split() for q in state.requests]
    assert all(p[:64] == prompts[0][:64] and len(p) == 80 for p in prompts)
    assert r["mean_prompt_tokens"] == 80
    assert r["cached_token_ratio"] >= 0.75  # the warmup request filled the fake's cache with the prefix


def test_seed_gives_the_same_requests(fake, capsys):
    url, state = fake
    runs = []
    for _ in range(2):
        state.reset()
        bench_json(capsys, url, *SMALL, "--seed", "11", "--concurrency", "1")
        runs.append([q["body"]["messages"] for q in state.requests])
    assert runs[0] == runs[1]


def test_failures_are_counted(fake, capsys):
    url, state = fake
    state.fail_every = 3  # requests 3 and 6 of 8 fail (no warmup, so the count is exact)
    code, r = bench_json(capsys, url, *SMALL, "--warmup", "0")
    assert code == 1 and r["completed"] == 6 and r["errors"] == 2
    assert r["error_samples"] and all(s.startswith("HTTP 500") for s in r["error_samples"])
    assert r["total_output_tokens"] == 6 * 6  # failed requests count no tokens

    state.reset()
    state.fail_every, state.fail_mode = 4, "chunk"
    code, r = bench_json(capsys, url, *SMALL, "--warmup", "0")
    assert code == 1 and r["completed"] == 6 and r["errors"] == 2
    assert all("injected stream failure" in s for s in r["error_samples"])


def test_without_usage_tokens_are_counted_from_chunks(fake, capsys):
    url, state = fake
    state.send_usage = False
    code, r = bench_json(capsys, url, *SMALL, "--no-ignore-eos")
    assert code == 0 and r["ignore_eos"] is False
    assert "ignore_eos" not in state.requests[-1]["body"]
    assert r["total_output_tokens"] == 8 * 3  # the fake stops at 3 tokens without ignore_eos
    assert r["mean_prompt_tokens"] is None and r["cached_token_ratio"] is None and r["total_input_tokens"] is None


def test_request_rate_and_output_file(fake, capsys, tmp_path):
    url, _ = fake
    out = tmp_path / "report.json"
    code, r = bench_json(capsys, url, *SMALL, "--request-rate", "200", "--output", str(out))
    assert code == 0 and r["request_rate"] == 200 and r["completed"] == 8
    assert json.loads(out.read_text()) == r


def test_table_output(fake, capsys):
    url, _ = fake
    assert bench(url, *SMALL) == 0
    table = capsys.readouterr().out
    for row in (
        "Model:",
        "fake-model",
        "Successful requests:",
        "Errors:",
        "Duration (s):",
        "Request throughput (req/s):",
        "Output token throughput (tok/s):",
        "Total token throughput (tok/s):",
        "Mean prompt tokens:",
        "Cached token ratio:",
        "TTFT",
        "TPOT",
        "ITL",
        "E2E latency",
        "p99",
    ):
        assert row in table, row
    assert not table.lstrip().startswith("{")


def test_request_timeout(fake, capsys):
    url, state = fake
    state.token_delay = 0.5
    start = time.monotonic()
    code, r = bench_json(capsys, url, "--num-requests", "2", "--concurrency", "2", "--warmup", "0", "--timeout", "0.3")
    assert time.monotonic() - start < 5
    assert code == 1 and r["completed"] == 0 and r["errors"] == 2
    assert "timed out" in r["error_samples"][0]


def test_unreachable_server(capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, r = bench_json(capsys, url, "--model", "m", "--num-requests", "3", "--warmup", "1", "--timeout", "5")
    assert code == 1 and r["completed"] == 0 and r["errors"] == 3 and r["warmup_errors"] == 1
    assert "ConnectError" in r["error_samples"][0]
    assert not math.isnan(r["request_throughput_req_s"])
    # Without --model the model list cannot be fetched: a clear message and exit status 1.
    assert bench(url, "--timeout", "5") == 1
    assert "cannot list models" in capsys.readouterr().err
