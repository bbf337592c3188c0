"""Admin endpoints of rank 0 for the prefix cache (behind the API key, like /v1).

    GET  /admin/cache          rank 0's cache statistics per tier
    POST /admin/cache/clear    empty the RAM and SSD tiers on every rank, at one step
    POST /admin/cache/warmup   prefill {"messages": [...]} or {"prompt": ...} into the cache

The clear travels in the step plan (FLAG_CLEAR_CACHE) so every rank clears at the same point
of the plan sequence; the response comes once rank 0 has executed that plan.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from mlx_cluster.server.generation import RequestStream, chat_prompt, completion_prompt, make_request, sampling_params
from mlx_cluster.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

CLEAR_TIMEOUT_S = 60.0


def _cache(state):
    if state.prefix_cache is None:
        raise APIError(400, "prefix caching is off for this model", code="prefix_cache_disabled")
    return state.prefix_cache


def _warmup_body_schema() -> dict:
    """/openapi.json: the warmup body is a chat `messages` list or a completions `prompt`, typed
    as in those requests (their sub-schemas are in components), so fuzzers and clients see it."""
    ref = "#/components/schemas/{model}"
    messages = ChatCompletionRequest.model_json_schema(ref_template=ref)["properties"]["messages"]
    prompt = CompletionRequest.model_json_schema(ref_template=ref)["properties"]["prompt"]
    schema = {
        "oneOf": [
            {"type": "object", "required": ["messages"], "properties": {"messages": messages}},
            {"type": "object", "required": ["prompt"], "properties": {"prompt": prompt}},
        ]
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # the waiter may have timed out already
        future.set_result(None)


def admin_router(state) -> APIRouter:
    from mlx_cluster.server.app import check_serving, read_json

    router = APIRouter()

    @router.get("/admin/cache")
    async def cache_stats():
        """Rank 0's tiers at the top level (live), and every rank's under `ranks` (from the
        status reports, at most a heartbeat old). The RAM tier holds the same blocks on every
        rank (it follows the plan); SSD tiers and the measured costs are per rank."""
        cache = _cache(state)
        status = getattr(state, "cluster_status", None)
        ranks = []
        for r in status.board.snapshot() if status is not None else []:
            ranks.append({"rank": r["rank"], "up": r["up"], "age_s": r["age_s"], **(r.get("cache") or {})})
        return {
            "object": "cache.stats",
            "world_size": state.world_size,
            "ram_tier_mirrored": True,
            **cache.stats().to_dict(),
            "ranks": ranks,
        }

    @router.post("/admin/cache/clear")
    async def cache_clear():
        _cache(state)
        check_serving(state)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        state.frontend.clear_cache(lambda: loop.call_soon_threadsafe(_resolve, done))  # runs on the engine thread
        try:
            await asyncio.wait_for(done, CLEAR_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(504, "the cache clear did not run within 60 s", type="timeout", code="timeout") from None
        return {"object": "cache.clear", "cleared": True, "ranks": state.world_size}

    @router.post("/admin/cache/warmup", openapi_extra=_warmup_body_schema())
    async def cache_warmup(request: Request):
        """Prefill a prompt without generating (one greedy token, discarded); returns how many of
        its leading tokens are now cached (whole blocks) and how many were reused from before."""
        cache = _cache(state)
        data = await read_json(request, state.config.server.max_request_bytes)
        if not isinstance(data, dict) or ("messages" in data) == ("prompt" in data):
            raise APIError(400, 'send either {"messages": [...]} or {"prompt": ...}', code="invalid_value")
        check_serving(state)
        body = {**data, "max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False}
        tokenizer = state.tokenizer
        if "messages" in data:
            req, kind = parse_request(ChatCompletionRequest, body), "chat"
            prompt = chat_prompt(tokenizer, req)
        else:
            req, kind = parse_request(CompletionRequest, body), "completions"
            prompt = completion_prompt(tokenizer, req, state.limits.vocab_size)
        params = sampling_params(req, len(prompt), state.limits, set(tokenizer.eos_token_ids))
        stream = RequestStream(asyncio.get_running_loop(), kind, state.model_name)
        if not state.frontend.submit(make_request(stream, prompt, params, req)):
            raise APIError(429, "the queue is full; retry soon", code="queue_full", headers={"Retry-After": "1"})
        try:
            async for _ in stream.events(state.config.server.request_timeout_s):
                pass
        finally:
            if not stream.finished:
                state.frontend.abort(stream.id)
        return {
            "object": "cache.warmup",
            "prompt_tokens": len(prompt),
            "cached_tokens": cache.cached_prefix_tokens(prompt),
            "reused_tokens": stream.done.cached_tokens,
        }

    return router
