"""POST /v1/chat/completions: the chat surface over the shared turn (server/turn.py).

It renders each choice's parts as OpenAI does: `message.content`, `message.reasoning_content`,
`message.tool_calls` (id, type, function.name, function.arguments as a JSON string) with
finish_reason `tool_calls`; streamed as deltas (a tool call's index, id and name first, its
arguments in pieces).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from mlx_cluster.agent.output import Content, Reasoning, ToolCall
from mlx_cluster.server.generation import RequestStream, chat_logprobs, sse
from mlx_cluster.server.protocol import APIError, ChatCompletionRequest
from mlx_cluster.server.turn import Turn, TurnEvent, finish, run_until_done, turn_events, turn_usage


def _delta(parts: list) -> dict:
    """One chunk's delta from the parts of one engine event."""
    delta: dict = {}
    calls: dict[int, dict] = {}
    for p in parts:
        if isinstance(p, Content):
            delta["content"] = delta.get("content", "") + p.text
        elif isinstance(p, Reasoning):
            delta["reasoning_content"] = delta.get("reasoning_content", "") + p.text
        elif isinstance(p, ToolCall):
            call = calls.get(p.index)
            if call is None:
                call = calls[p.index] = {"index": p.index}
                if p.id is not None:
                    call.update(id=p.id, type="function", function={"name": p.name, "arguments": ""})
                else:
                    call["function"] = {"arguments": ""}
            call["function"]["arguments"] += p.arguments
    if calls:
        delta["tool_calls"] = [calls[i] for i in sorted(calls)]
    return delta


def _chunk(stream: RequestStream, index: int, delta: dict, finish_reason, logprobs=None) -> dict:
    return {
        "id": stream.id,
        "object": "chat.completion.chunk",
        "created": stream.created,
        "model": stream.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


async def stream_chat(state, stream: RequestStream, turn: Turn, req: ChatCompletionRequest, timeout_s: float):
    """SSE body: a role chunk per choice, one chunk per engine event, optional usage, [DONE]."""
    tokenizer = state.tokenizer
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    outcome = "ok"
    try:
        for i in range(turn.n):
            yield sse(_chunk(stream, i, {"role": "assistant", "content": ""}, None))
        async for ev in turn_events(state, stream, turn, timeout_s):
            logprobs = {"content": chat_logprobs(tokenizer, ev.token.logprobs)} if ev.token.logprobs else None
            yield sse(_chunk(stream, ev.index, _delta(ev.parts), ev.finish_reason, logprobs))
        if include_usage:
            yield sse({**_chunk(stream, 0, {}, None), "choices": [], "usage": turn_usage(stream)})
        yield b"data: [DONE]\n\n"
    except APIError as e:
        outcome = "error"
        yield sse(e.body())
        yield b"data: [DONE]\n\n"
    finally:
        finish(state, stream, outcome)


class _Choice:
    def __init__(self, index: int):
        self.index = index
        self.parts: list = []
        self.logprobs: list = []
        self.finish_reason = None


def gather_choices(events: list[TurnEvent], n: int) -> list[_Choice]:
    choices = [_Choice(i) for i in range(n)]
    for ev in events:
        c = choices[ev.index]
        c.parts.extend(ev.parts)
        c.logprobs.extend(ev.token.logprobs)
        if ev.finish_reason is not None:
            c.finish_reason = ev.finish_reason
    return choices


def chat_message(parts: list, turn: Turn) -> dict:
    """The assistant message of one choice."""
    from mlx_cluster.agent.output import collect

    reasoning, content, tool_calls = collect(parts)
    message: dict = {"role": "assistant", "content": content if content or not tool_calls else None}
    if turn.reasoning is not None:
        message["reasoning_content"] = reasoning or None
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


async def collect_chat(state, request, stream: RequestStream, turn: Turn, timeout_s: float):
    """Non-streaming: gather every choice, aborting if the client disconnects meanwhile."""
    events: list[TurnEvent] = []

    async def consume():
        async for ev in turn_events(state, stream, turn, timeout_s):
            events.append(ev)

    if not await run_until_done(state, request, stream, consume):
        return Response(status_code=499)  # nobody is listening any more
    choices = []
    for c in gather_choices(events, turn.n):
        choices.append(
            {
                "index": c.index,
                "message": chat_message(c.parts, turn),
                "logprobs": {"content": chat_logprobs(state.tokenizer, c.logprobs)} if c.logprobs else None,
                "finish_reason": c.finish_reason,
            }
        )
    body = {
        "id": stream.id,
        "object": "chat.completion",
        "created": stream.created,
        "model": stream.model,
        "choices": choices,
        "usage": turn_usage(stream),
    }
    return JSONResponse(body)
