"""Send streaming OpenAI requests and time them.

One `RequestResult` per request records what the report needs: time to first token, the
gaps between tokens, end-to-end latency, token counts from the server's usage chunk, and
whether (and why) the request failed. `run_phase` sends a list of prompts with a bounded
number in flight and optional Poisson arrivals.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from mlx_cluster.bench.sse import DONE, chunk_error, chunk_text, sse_data

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass
class Target:
    """Where and what to send: everything that is the same for every request."""

    base_url: str  # ends in /v1
    model: str
    endpoint: str = "chat"  # "chat" | "completions"
    output_len: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 300.0

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]

    def body(self, prompt: str) -> dict:
        """The JSON body of one streaming request for `prompt`."""
        body: dict = {
            "model": self.model,
            "max_tokens": self.output_len,
            "temperature": self.temperature,
            "stream": True,
            # Without this the stream carries no token counts: the final chunk (choices == [])
            # then reports prompt_tokens, completion_tokens and cached prompt tokens.
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            # Non-standard (vLLM, mlx-cluster): generate exactly max_tokens so every request
            # does the same amount of work. Left out rather than sent as false, because strict
            # servers reject unknown keys.
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body


@dataclass
class RequestResult:
    """Timings and counts of one request. Times are in seconds."""

    success: bool = False
    error: str | None = None
    ttft_s: float | None = None  # send -> first chunk carrying a token
    e2e_s: float | None = None  # send -> end of stream (or failure)
    itl_s: list[float] = field(default_factory=list)  # gaps between successive token chunks
    content_chunks: int = 0  # chunks that carried text
    completion_tokens: int | None = None  # from usage; None when the server sent none
    prompt_tokens: int | None = None  # from usage; None when the server sent none
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the server's count if it sent usage, else the text chunks seen
        (an undercount if the server packs several tokens into one chunk)."""
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; undefined for fewer than two tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _record_usage(result: RequestResult, usage: dict) -> None:
    if isinstance(usage.get("prompt_tokens"), int):
        result.prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        result.completion_tokens = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details") or {}
    if isinstance(details.get("cached_tokens"), int):
        result.cached_tokens = details["cached_tokens"]


async def _stream(client: httpx.AsyncClient, target: Target, prompt: str, result: RequestResult, start: float) -> None:
    """Send one request and fill `result` from its stream; sets result.error on failure."""
    async with client.stream("POST", target.url, json=target.body(prompt)) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", errors="replace")
            result.error = f"HTTP {resp.status_code}: {text[:300]}"
            return
        last_token_at = None
        async for line in resp.aiter_lines():
            data = sse_data(line)
            if data is None:
                continue
            if data.strip() == DONE:
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                result.error = f"invalid JSON in stream: {data[:200]}"
                return
            if not isinstance(chunk, dict):
                result.error = f"unexpected chunk in stream: {data[:200]}"
                return
            message = chunk_error(chunk)
            if message is not None:
                result.error = f"error in stream: {message[:300]}"
                return
            if chunk.get("usage"):
                _record_usage(result, chunk["usage"])
            if chunk_text(chunk, target.endpoint):
                now = time.perf_counter()
                if last_token_at is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last_token_at)
                last_token_at = now
                result.content_chunks += 1
        # A stream cut short (server crash, proxy timeout) must not pass as a short success.
        result.error = "stream ended without data: [DONE]"


async def send_request(client: httpx.AsyncClient, target: Target, prompt: str) -> RequestResult:
    """Send one streaming request and time it. Never raises for request failures."""
    result = RequestResult()
    start = time.perf_counter()
    try:
        # httpx's timeout bounds each connect/read; wait_for bounds the whole request, so a
        # server that trickles bytes forever still cannot hang the benchmark.
        await asyncio.wait_for(_stream(client, target, prompt, result, start), target.timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timed out after {target.timeout_s:g} s"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    except Exception as e:  # one bad request must not abort the whole benchmark
        result.error = f"{type(e).__name__}: {e}"
    result.e2e_s = time.perf_counter() - start
    result.success = result.error is None
    return result


async def run_phase(
    client: httpx.AsyncClient,
    target: Target,
    prompts: list[str],
    concurrency: int,
    request_rate: float = math.inf,
    rng: random.Random | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send every prompt once, at most `concurrency` in flight; return (results, seconds).

    With a finite `request_rate`, requests arrive as a Poisson process (exponential gaps
    drawn from `rng`, so the schedule is reproducible); a request that arrives while
    `concurrency` are in flight waits for a free slot, and its latency is timed from when
    it is actually sent. Results are in prompt order.
    """
    rng = rng or random.Random(0)
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> RequestResult:
        async with slots:
            result = await send_request(client, target, prompt)
        if on_done is not None:
            on_done(result)
        return result

    start = time.perf_counter()
    tasks = []
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(request_rate) and request_rate > 0:
            await asyncio.sleep(rng.expovariate(request_rate))
        tasks.append(asyncio.create_task(one(prompt)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def make_client(concurrency: int, api_key: str | None, timeout_s: float) -> httpx.AsyncClient:
    """An AsyncClient with a connection per concurrent request and the bearer token set."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Enough pooled connections for every in-flight request, or requests would queue inside
    # httpx and their queueing time would be counted as server latency.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: measure the server, not an HTTP(S)_PROXY picked up from the environment.
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False)


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id listed by GET {base_url}/models; raises RuntimeError if none."""
    resp = await client.get(base_url + "/models")
    if resp.status_code != 200:
        raise RuntimeError(f"GET {base_url}/models: HTTP {resp.status_code}: {resp.text[:200]}")
    models = resp.json().get("data") or []
    if not models or not models[0].get("id"):
        raise RuntimeError(f"GET {base_url}/models listed no models; pass --model")
    return models[0]["id"]
