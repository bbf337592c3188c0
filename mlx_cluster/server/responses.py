"""POST /v1/responses, GET / DELETE /v1/responses/{id}: OpenAI's Responses API over the shared turn.

The request (string or item input, instructions, function tools, tool_choice, text.format,
previous_response_id) is translated into a chat request and runs as a `Turn`; the turn's parts
come back as output items (reasoning, message with output_text, function_call), whole or as the
documented event stream (response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta / done, function_call_arguments.delta / done,
content_part.done, output_item.done, response.completed or response.incomplete).
Stored responses (store: true, the default) live in `server/response_store.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlx_cluster.agent.output import Content, Reasoning, ToolCall, collect
from mlx_cluster.server.generation import RequestStream, sse, sse_response
from mlx_cluster.server.lora_routes import resolve_model
from mlx_cluster.server.protocol import APIError, ChatCompletionRequest, parse_request
from mlx_cluster.server.turn import finish, prepare_turn, run_until_done, submit, turn_events


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Model):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the Responses API enforces function tools unless strict is false


class NamedTool(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Model):
    format: TextFormat | None = None


class ReasoningConfig(_Model):
    effort: str | None = None


class ResponsesRequest(_Model):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


_ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}


def _param(param: str | None) -> str | None:
    """A chat field's name in Responses API terms."""
    if param is None:
        return None
    if param.startswith("response_format"):
        return "text.format.schema"
    if param.startswith("messages"):
        return "input"
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    return param.replace(".function.", ".")


def _translated(e: APIError) -> APIError:
    param, message = _param(e.param), e.message
    if e.param and message.startswith(e.param):
        message = param + message[len(e.param) :]
    return APIError(e.status, message, param=param, code=e.code, headers=e.headers)


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's input items as chat messages."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict] = []
    for i, raw in enumerate(req.input):
        kind = raw.get("type", "message")
        if kind in ("reasoning", "item_reference"):
            continue  # earlier reasoning is not shown to the model again; references are not kept
        model = _ITEMS.get(kind)
        if model is None:
            raise APIError(400, f"input.{i}.type: items of type {kind!r} are not supported", param=f"input.{i}.type")
        try:
            item = model.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in (f"input.{i}", *err["loc"]) if not str(p).startswith(("str", "list[")))
            raise APIError(400, f"{where}: {err['msg']}", param=where, code="invalid_value") from None
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    if not messages:
        raise APIError(400, "input: no message to respond to", param="input", code="invalid_value")
    return messages


def to_chat(req: ResponsesRequest, history: list[dict], new: list[dict]) -> ChatCompletionRequest:
    body: dict = {
        "messages": ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history + new
    }
    for key, value in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature), ("top_p", req.top_p)):
        if value is not None:
            body[key] = value
    if req.tools:
        tools = []
        for i, raw in enumerate(req.tools):
            if raw.get("type") != "function":
                raise APIError(400, f"tools.{i}.type: only function tools are supported", param=f"tools.{i}.type")
            try:
                t = FunctionTool.model_validate(raw)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in (f"tools.{i}", *err["loc"]))
                raise APIError(400, f"{where}: {err['msg']}", param=where, code="invalid_value") from None
            function = {
                "name": t.name,
                "parameters": t.parameters or {"type": "object"},
                "strict": t.strict is not False,
            }
            if t.description:
                function["description"] = t.description
            tools.append({"type": "function", "function": function})
        body["tools"] = tools
        body["parallel_tool_calls"] = req.parallel_tool_calls
    choice = req.tool_choice
    if choice is not None:
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format.schema: required when type is json_schema", param="text.format.schema")
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name or "output", "schema": fmt.schema_},
        }
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.reasoning.effort not in ("none", "minimal")}
    try:
        return parse_request(ChatCompletionRequest, body)
    except APIError as e:
        raise _translated(e) from None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Output:
    """Builds output items from parts, and (when streaming) their events, in output order."""

    def __init__(self, emit=None):
        self.items: list[dict] = []
        self.emit = emit  # callback(event dict) when streaming
        self.open: dict | None = None
        self.calls: dict[int, dict] = {}

    def add(self, parts: list) -> None:
        for p in parts:
            if isinstance(p, ToolCall):
                if p.id is not None:
                    self._close()
                    item = {
                        "type": "function_call",
                        "id": _new_id("fc"),
                        "call_id": p.id,
                        "name": p.name,
                        "arguments": "",
                        "status": "in_progress",
                    }
                    self.calls[p.index] = item
                    self._open(item)
                item = self.calls[p.index]
                if p.arguments:
                    item["arguments"] += p.arguments
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=item["_index"],
                        delta=p.arguments,
                    )
            elif isinstance(p, Reasoning):
                if self.open is None or self.open["type"] != "reasoning":
                    self._close()
                    self._open({"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": []})
                    self.open["content"].append({"type": "reasoning_text", "text": ""})
                    self.open["_text"] = self.open["content"][0]
                self.open["_text"]["text"] += p.text
                self._event(
                    "response.reasoning_text.delta",
                    item_id=self.open["id"],
                    output_index=len(self.items) - 1,
                    content_index=0,
                    delta=p.text,
                )
            elif isinstance(p, Content):
                if self.open is None or self.open["type"] != "message":
                    self._close()
                    item = {
                        "type": "message",
                        "id": _new_id("msg"),
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    }
                    self._open(item)
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    item["content"].append(part)
                    self._event(
                        "response.content_part.added",
                        item_id=item["id"],
                        output_index=len(self.items) - 1,
                        content_index=0,
                        part=dict(part),
                    )
                self.open["content"][0]["text"] += p.text
                self._event(
                    "response.output_text.delta",
                    item_id=self.open["id"],
                    output_index=len(self.items) - 1,
                    content_index=0,
                    delta=p.text,
                    logprobs=[],
                )

    def finish(self, status: str) -> list[dict]:
        self._close(status)
        for item in self.items:
            item.pop("_text", None)
            item.pop("_index", None)
        return self.items

    def _open(self, item: dict) -> None:
        item["_index"] = len(self.items)
        self.items.append(item)
        self.open = item
        shown = {k: v for k, v in item.items() if not k.startswith("_")}
        self._event("response.output_item.added", output_index=len(self.items) - 1, item=json.loads(json.dumps(shown)))

    def _close(self, status: str = "completed") -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index = item["_index"]
        if item["type"] == "message":
            part = dict(item["content"][0])
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            )
            self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            )
        elif item["type"] == "function_call":
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        else:
            self._event(
                "response.reasoning_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=item["_text"]["text"],
            )
        if "status" in item:
            item["status"] = status
        shown = {k: v for k, v in item.items() if not k.startswith("_")}
        self._event("response.output_item.done", output_index=index, item=json.loads(json.dumps(shown)))

    def _event(self, kind: str, **fields) -> None:
        if self.emit is not None:
            self.emit({"type": kind, **fields})


class ResponseRun:
    """One /v1/responses request: the response object it builds and what gets stored."""

    def __init__(self, state, req: ResponsesRequest, history: list[dict], new: list[dict], turn, chat):
        self.state, self.req, self.turn = state, req, turn
        self.history = history + new
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.chat = chat

    def response(self, status: str, output: list[dict], stream: RequestStream | None) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        usage = None
        if stream is not None and stream.done is not None:
            done = stream.done
            output_stats = getattr(stream, "output", None)
            usage = {
                "input_tokens": done.prompt_tokens,
                "input_tokens_details": {"cached_tokens": done.cached_tokens},
                "output_tokens": done.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": output_stats.reasoning_tokens if output_stats else 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            }
        tool_choice = req.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model or self.state.model_name,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store,
            "temperature": self.turn.params.temperature,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": tool_choice.model_dump() if isinstance(tool_choice, BaseModel) else (tool_choice or "auto"),
            "tools": req.tools or [],
            "top_p": self.turn.params.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def store(self, response: dict, output: list[dict]) -> None:
        store = self.state.responses
        if not self.req.store or store is None:
            return
        parts = []
        for item in output:
            if item["type"] == "message":
                parts.append(Content(item["content"][0]["text"]))
            elif item["type"] == "function_call":
                parts.append(ToolCall(len(parts), item["call_id"], item["name"], item["arguments"]))
        _, content, tool_calls = collect(parts)
        reply = {"role": "assistant", "content": content}
        if tool_calls:
            reply["tool_calls"] = tool_calls
        store.put(self.id, response, [*self.history, reply])


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def prepare(state, req: ResponsesRequest) -> ResponseRun:
    history: list[dict] = []
    if req.previous_response_id is not None:
        stored = state.responses.get(req.previous_response_id) if state.responses is not None else None
        if stored is None:
            raise APIError(
                404,
                f"previous_response_id: response {req.previous_response_id!r} was not found (it may have expired)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = stored.history
    new = input_messages(req)
    chat = to_chat(req, history, new)
    try:
        turn = prepare_turn(state, chat)
    except APIError as e:
        raise _translated(e) from None
    return ResponseRun(state, req, history, new, turn, chat)


async def responses_endpoint(state, request, req: ResponsesRequest) -> Response:
    run = prepare(state, req)
    stream = RequestStream(asyncio.get_running_loop(), "chat", resolve_model(state, req.model))
    stream.id = run.id
    submit(state, stream, run.turn)
    timeout_s = state.config.server.request_timeout_s
    if req.stream:
        return sse_response(_stream(state, run, stream, timeout_s))
    output = _Output()
    last = None

    async def consume():
        nonlocal last
        async for ev in turn_events(state, stream, run.turn, timeout_s):
            output.add(ev.parts)
            if ev.finish_reason is not None:
                last = ev.finish_reason

    if not await run_until_done(state, request, stream, consume):
        return Response(status_code=499)
    status = _status(last)
    items = output.finish(status)
    body = run.response(status, items, stream)
    run.store(body, items)
    return JSONResponse(body)


async def _stream(state, run: ResponseRun, stream: RequestStream, timeout_s: float):
    events: list[dict] = []
    sequence = 0
    output = _Output(emit=events.append)

    def frames():
        nonlocal sequence
        out = []
        for event in events:
            out.append(_sse_event({**event, "sequence_number": sequence}))
            sequence += 1
        events.clear()
        return out

    outcome = "ok"
    try:
        events.append({"type": "response.created", "response": run.response("in_progress", [], None)})
        events.append({"type": "response.in_progress", "response": run.response("in_progress", [], None)})
        for frame in frames():
            yield frame
        last = None
        async for ev in turn_events(state, stream, run.turn, timeout_s):
            output.add(ev.parts)
            if ev.finish_reason is not None:
                last = ev.finish_reason
            for frame in frames():
                yield frame
        status = _status(last)
        items = output.finish(status)
        body = run.response(status, items, stream)
        run.store(body, items)
        events.append(
            {"type": "response.completed" if status == "completed" else "response.incomplete", "response": body}
        )
        for frame in frames():
            yield frame
    except APIError as e:
        outcome = "error"
        body = run.response("failed", output.items, None)
        body["error"] = {"code": e.code or "server_error", "message": e.message}
        events.append({"type": "response.failed", "response": body})
        for frame in frames():
            yield frame
    finally:
        finish(state, stream, outcome)


def _sse_event(event: dict) -> bytes:
    return f"event: {event['type']}\n".encode() + sse(event)


def get_response(state, response_id: str) -> dict:
    stored = state.responses.get(response_id) if state.responses is not None else None
    if stored is None:
        raise APIError(404, f"response {response_id!r} was not found (it may have expired)", code="not_found")
    return stored.response


def delete_response(state, response_id: str) -> dict:
    if state.responses is None or not state.responses.delete(response_id):
        raise APIError(404, f"response {response_id!r} was not found (it may have expired)", code="not_found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}
