"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the shared turn.

The request is translated into a chat request (system, text / tool_use / tool_result blocks,
tools with `input_schema`, tool_choice auto / any / tool / none, thinking) and runs as a
`Turn`; the turn's parts come back as Anthropic content blocks (thinking, text, tool_use), whole
or as the documented event stream (message_start, content_block_start / delta / stop,
message_delta, message_stop). Errors on these routes use Anthropic's envelope (server/app.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mlx_cluster.agent.output import Content, Reasoning, ToolCall
from mlx_cluster.server.generation import RequestStream, sse_response
from mlx_cluster.server.lora_routes import resolve_model
from mlx_cluster.server.protocol import APIError, ChatCompletionRequest, anthropic_error_body, parse_request
from mlx_cluster.server.turn import finish, prepare_turn, run_until_done, submit, turn_events

DEFAULT_TEMPERATURE = 1.0  # Anthropic's default


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


class ThinkingBlock(_Model):
    type: Literal["thinking", "redacted_thinking"]  # earlier reasoning: not shown to the model again


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(_Model):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # Anthropic's server tools (web search, ...) are not run here
    strict: bool | None = None


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class OutputFormat(_Model):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Model):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    format: OutputFormat | None = None
    effort: str | None = None  # accepted, no effect here


class MessagesRequest(_Model):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=16)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None  # structured outputs: format {type: json_schema, schema}
    metadata: dict[str, Any] | None = None

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = Field(None, ge=1)


# Where a chat field's error came from, in Messages API terms.
def _param(param: str | None) -> str | None:
    if param is None:
        return None
    if param == "stop":
        return "stop_sequences"
    if param.startswith("response_format"):
        return "output_config.format.schema"
    if param.startswith("tools.") and param.endswith(".function.parameters"):
        return param.replace(".function.parameters", ".input_schema")
    return param.replace(".function.", ".")


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(b.text for b in content)


def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    """The equivalent chat request (validated like any chat request)."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        texts = [b.text for b in m.content if isinstance(b, TextBlock)]
        if m.role == "assistant":
            calls = [
                {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                for b in m.content
                if isinstance(b, ToolUseBlock)
            ]
            msg: dict = {"role": "assistant", "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            continue
        for b in m.content:
            if isinstance(b, ToolUseBlock):
                raise APIError(400, f"messages.{i}: tool_use blocks belong in assistant turns", param=f"messages.{i}")
            if isinstance(b, ToolResultBlock):
                text = _text(b.content)
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": text})
        if texts or not any(isinstance(b, ToolResultBlock) for b in m.content):
            messages.append({"role": "user", "content": "".join(texts)})
    body: dict = {
        "messages": messages,
        "max_tokens": req.max_tokens or 1,
        "temperature": DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
    }
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.top_k is not None:
        body["top_k"] = req.top_k
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.tools:
        for i, t in enumerate(req.tools):
            if t.type not in (None, "custom"):
                raise APIError(
                    400, f"tools.{i}.type: only custom (client) tools are supported", param=f"tools.{i}.type"
                )
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.input_schema,
                    **({"strict": t.strict} if t.strict is not None else {}),
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice.name: required when type is tool", param="tool_choice.name")
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if req.output_config is not None and req.output_config.format is not None:
        schema = req.output_config.format.schema_
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    if req.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    try:
        return parse_request(ChatCompletionRequest, body)
    except APIError as e:
        raise _translated(e) from None


def _translated(e: APIError) -> APIError:
    """The same error, naming the Messages API field instead of the chat one."""
    param, message = _param(e.param), e.message
    if e.param and message.startswith(e.param):
        message = param + message[len(e.param) :]
    return APIError(e.status, message, param=param, code=e.code, headers=e.headers)


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    if stop_sequence is not None:
        return "stop_sequence"
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish_reason or "stop", "end_turn")


def _usage(stream: RequestStream) -> dict:
    done = stream.done
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "output_tokens": done.completion_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _blocks(parts: list) -> list[dict]:
    """Content blocks of a whole message: thinking, text and tool_use, in output order."""
    blocks: list[dict] = []
    calls: dict[int, dict] = {}
    for p in parts:
        if isinstance(p, ToolCall):
            if p.id is not None:
                calls[p.index] = block = {"type": "tool_use", "id": _tool_id(p.id), "name": p.name, "input": ""}
                blocks.append(block)
            calls[p.index]["input"] += p.arguments
            continue
        kind, key = ("thinking", "thinking") if isinstance(p, Reasoning) else ("text", "text")
        if not blocks or blocks[-1]["type"] != kind:
            blocks.append({"type": kind, key: ""} | ({"signature": ""} if kind == "thinking" else {}))
        blocks[-1][key] += p.text
    for block in calls.values():
        try:
            block["input"] = json.loads(block["input"]) if block["input"] else {}
        except json.JSONDecodeError:  # cut short by max_tokens: stop_reason says so
            block["input"] = {}
    return blocks


def _message(stream_id: str, model: str, content: list, stop_reason, stop_sequence, usage: dict) -> dict:
    return {
        "id": stream_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _BlockStream:
    """Turns parts into content_block_start / delta / stop events, one open block at a time."""

    def __init__(self):
        self.index = -1
        self.open: tuple | None = None  # ("text" | "thinking",) or ("tool_use", call index)

    def parts(self, parts: list) -> list[bytes]:
        out: list[bytes] = []
        for p in parts:
            if isinstance(p, ToolCall):
                if p.id is not None:
                    out += self._start(
                        ("tool_use", p.index), {"type": "tool_use", "id": _tool_id(p.id), "name": p.name, "input": {}}
                    )
                if p.arguments:
                    out.append(self._delta({"type": "input_json_delta", "partial_json": p.arguments}))
            elif isinstance(p, Reasoning):
                if self.open != ("thinking",):
                    out += self._start(("thinking",), {"type": "thinking", "thinking": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": p.text}))
            elif isinstance(p, Content):
                if self.open != ("text",):
                    out += self._start(("text",), {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": p.text}))
        return out

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        kind = self.open[0]
        self.open = None
        out = []
        if kind == "thinking":  # clients replay thinking blocks with a signature; ours is empty
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return out

    def _start(self, key: tuple, block: dict) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.open = key
        out.append(
            _event("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})
        )
        return out

    def _delta(self, delta: dict) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})


async def stream_messages(state, stream: RequestStream, turn, timeout_s: float):
    blocks = _BlockStream()
    outcome = "ok"
    usage = {"input_tokens": len(turn.prompt), "output_tokens": 0}
    try:
        yield _event(
            "message_start",
            {"type": "message_start", "message": _message(stream.id, stream.model, [], None, None, usage)},
        )
        stop_reason, stop_sequence = None, None
        async for ev in turn_events(state, stream, turn, timeout_s):
            for frame in blocks.parts(ev.parts):
                yield frame
            if ev.finish_reason is not None:
                stop_sequence = ev.token.stop_sequence
                stop_reason = _stop_reason(ev.finish_reason, stop_sequence)
        for frame in blocks.close():
            yield frame
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": _usage(stream)})
        yield _event("message_stop", {"type": "message_stop"})
    except APIError as e:
        outcome = "error"
        yield _event("error", anthropic_error_body(e))
    finally:
        finish(state, stream, outcome)


async def messages_endpoint(state, request, req: MessagesRequest) -> Response:
    chat = to_chat(req)
    turn = _prepare(state, chat)
    stream = RequestStream(asyncio.get_running_loop(), "chat", resolve_model(state, req.model))
    stream.id = "msg_" + uuid.uuid4().hex[:24]
    submit(state, stream, turn)
    timeout_s = state.config.server.request_timeout_s
    if req.stream:
        return sse_response(stream_messages(state, stream, turn, timeout_s))
    parts, last = [], None

    async def consume():
        nonlocal last
        async for ev in turn_events(state, stream, turn, timeout_s):
            parts.extend(ev.parts)
            if ev.finish_reason is not None:
                last = ev

    if not await run_until_done(state, request, stream, consume):
        return Response(status_code=499)
    stop_sequence = last.token.stop_sequence if last else None
    body = _message(
        stream.id,
        stream.model,
        _blocks(parts),
        _stop_reason(last.finish_reason if last else None, stop_sequence),
        stop_sequence,
        _usage(stream),
    )
    return JSONResponse(body)


def count_tokens_endpoint(state, req: CountTokensRequest) -> dict:
    turn = _prepare(state, to_chat(req))
    return {"input_tokens": len(turn.prompt)}


def _prepare(state, chat: ChatCompletionRequest):
    try:
        return prepare_turn(state, chat)
    except APIError as e:
        raise _translated(e) from None
