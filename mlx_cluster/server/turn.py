"""The one internal request and event stream behind every generating API surface.

Chat completions, the Responses API and the Messages API all end up here: a validated
`ChatCompletionRequest` (the other surfaces translate their bodies into one) becomes a `Turn`:
the prompt rendered through the model's chat template (tools included), the sampling
parameters, and the grammar that enforces `response_format` / `tool_choice` / strict tools.
Its engine events come back as `TurnEvent`s: each choice's text split by `agent.OutputParser`
into reasoning, answer text and tool calls. Each surface only renders those in its own shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mlx_cluster.agent.formats import ReasoningFormat, ToolFormat, resolve_reasoning_format, resolve_tool_format
from mlx_cluster.agent.output import OutputParser
from mlx_cluster.constrain.grammar import Answer, ConstraintSpec, GrammarCompiler, GrammarError, Tool
from mlx_cluster.engine.frontend import GenerationRequest, TokenEvent
from mlx_cluster.engine.plan import MAX_GRAMMAR_BYTES, SamplingParams
from mlx_cluster.server.generation import RequestStream, chat_text, sampling_params, usage
from mlx_cluster.server.lora_routes import adapter_slot
from mlx_cluster.server.protocol import APIError, ChatCompletionRequest

log = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass
class AgentSetup:
    """What rank 0 knows about the model's agent formats (from `model.tool_parser` /
    `model.reasoning_parser`) and the grammar compiler for its tokenizer."""

    tool_format: ToolFormat | None
    reasoning: ReasoningFormat | None
    compiler: GrammarCompiler | None


def make_agent_setup(model_cfg, tokenizer, vocab_size: int) -> AgentSetup:
    tool_format = resolve_tool_format(model_cfg.tool_parser, tokenizer)
    reasoning = resolve_reasoning_format(model_cfg.reasoning_parser, tokenizer)
    try:
        compiler = GrammarCompiler(tokenizer, vocab_size)
    except Exception as e:  # e.g. a slow (non-Rust) tokenizer llguidance cannot read
        log.warning("structured outputs are off: llguidance cannot use this tokenizer (%s)", e)
        compiler = None
    log.info(
        "agent formats: tool parser %s, reasoning parser %s",
        tool_format.name if tool_format else "none",
        reasoning.name if reasoning else "none",
    )
    return AgentSetup(tool_format, reasoning, compiler)


@dataclass
class Turn:
    """One generation request, whatever API it came through."""

    prompt: list[int]
    params: SamplingParams
    n: int = 1
    stop: list[str] = field(default_factory=list)
    grammar: str = ""
    tool_format: ToolFormat | None = None  # None: do not look for tool calls in the output
    reasoning: ReasoningFormat | None = None
    in_reasoning: bool = False  # the prompt opened a reasoning block the reply starts inside
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, for the parsers

    def parser(self) -> OutputParser:
        return OutputParser(
            tools=self.tool_format, reasoning=self.reasoning, in_reasoning=self.in_reasoning, tool_specs=self.tools
        )


@dataclass
class TurnEvent:
    """One engine token event of one choice, split into parts (agent.output)."""

    index: int
    token: TokenEvent
    parts: list
    finish_reason: str | None  # stop | length | tool_calls, on the choice's last event


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _tool_choice(req: ChatCompletionRequest) -> tuple[str, str | None]:
    """("none" | "auto" | "required", named function or None)."""
    choice = req.tool_choice
    if choice is None:
        return ("auto" if req.tools else "none"), None
    if isinstance(choice, str):
        if choice == "required" and not req.tools:
            raise APIError(400, "tool_choice: 'required' needs at least one tool in tools", param="tool_choice")
        return choice, None
    names = [t.function.name for t in req.tools or []]
    if choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice: function {choice.function.name!r} is not among the tools ({', '.join(names) or 'none given'})",
            param="tool_choice",
            code="invalid_value",
        )
    return "required", choice.function.name


def _schema(value, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{param}: not valid JSON: {e}", param=param, code="invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: a JSON schema must be an object", param=param, code="invalid_value")
    return value


def answer_constraint(req: ChatCompletionRequest) -> Answer | None:
    """response_format, or vLLM's structured_outputs / guided_* extensions (one at a time)."""
    found: list[Answer] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(Answer("json", schema={"type": "object"}, param="response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(
                400,
                "response_format.json_schema: required when type is json_schema",
                param="response_format.json_schema",
                code="invalid_value",
            )
        param = "response_format.json_schema.schema"
        found.append(Answer("json", schema=_schema(rf.json_schema.schema_, param), param=param))
    so = req.structured_outputs
    for kind, value, param in (
        ("json", so and so.json_, "structured_outputs.json"),
        ("regex", so and so.regex, "structured_outputs.regex"),
        ("choice", so and so.choice, "structured_outputs.choice"),
        ("json", req.guided_json, "guided_json"),
        ("regex", req.guided_regex, "guided_regex"),
        ("choice", req.guided_choice, "guided_choice"),
    ):
        if value is None:
            continue
        if kind == "json":
            found.append(Answer("json", schema=_schema(value, param), param=param))
        elif kind == "regex":
            found.append(Answer("regex", pattern=value, param=param))
        else:
            found.append(Answer("choice", choices=tuple(value), param=param))
    if len(found) > 1:
        raise APIError(
            400,
            f"{found[1].param}: give only one output constraint (also got {found[0].param})",
            param=found[1].param,
            code="invalid_value",
        )
    return found[0] if found else None


def prepare_turn(state, req: ChatCompletionRequest) -> Turn:
    """Render, tokenize, constrain and parameterize a chat request (raises 400 APIErrors)."""
    agent: AgentSetup = state.agent
    tokenizer = state.tokenizer
    mode, named = _tool_choice(req)
    tool_defs = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []]
    rendered = tool_defs if mode != "none" else []
    text = chat_text(tokenizer, req, rendered)
    prompt = list(tokenizer.encode(text, add_special_tokens=False))
    params = sampling_params(req, len(prompt), state.limits, set(tokenizer.eos_token_ids))

    reasoning = agent.reasoning
    in_reasoning = reasoning is not None and text.rfind(reasoning.start) > text.rfind(reasoning.end)
    tool_format = agent.tool_format if rendered else None
    if rendered and tool_format is None:
        _warn_once("no-parser", "requests send tools but this model has no tool parser (model.tool_parser)")

    answer = answer_constraint(req)
    tools = tuple(
        Tool(t.function.name, t.function.parameters or {"type": "object"}, param=f"tools.{i}.function.parameters")
        for i, t in enumerate(req.tools or [])
        if named is None or t.function.name == named
    )
    strict = [i for i, t in enumerate(req.tools or []) if t.function.strict]
    tool_mode = "none"
    if mode == "required":
        tool_mode = "required"
    elif mode == "auto" and (strict or answer is not None):
        tool_mode = "auto"
    syntax = tool_format.syntax if tool_format is not None else None
    if tool_mode != "none" and syntax is None:
        if strict:
            name = tool_format.name if tool_format else "none"
            raise APIError(
                400,
                f"tools.{strict[0]}.function.strict: this model's tool-call format ({name}) cannot be enforced",
                param=f"tools.{strict[0]}.function.strict",
                code="invalid_value",
            )
        _warn_once("no-syntax", "tool_choice required/named is prompted but not enforced for this tool format")
        tool_mode = "none"

    spec = ConstraintSpec(
        answer=answer,
        tools=tools,
        tool_mode=tool_mode,
        parallel=req.parallel_tool_calls and named is None,
        syntax=syntax,
        think_end=reasoning.end if in_reasoning else "",
    )
    grammar = ""
    if not spec.empty:
        if agent.compiler is None:
            raise APIError(400, "this server cannot enforce output constraints for this model's tokenizer")
        try:
            grammar = agent.compiler.compile(spec)
        except GrammarError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
            param = answer.param if answer is not None else "tools"
            raise APIError(
                400,
                f"{param}: the output constraint compiles to {len(grammar.encode())} bytes; "
                f"this server takes at most {MAX_GRAMMAR_BYTES} (use smaller schemas or fewer tools)",
                param=param,
                code="invalid_value",
            )
    if grammar:
        # The grammar ends with end-of-sequence, so it must stop the sequence even with ignore_eos.
        params = dataclasses.replace(params, stop_token_ids=tuple(sorted(tokenizer.eos_token_ids)))
    return Turn(
        prompt=prompt,
        params=params,
        n=req.n,
        stop=req.stop_list,
        grammar=grammar,
        tool_format=tool_format,
        reasoning=reasoning,
        in_reasoning=in_reasoning,
        tools=tool_defs,
    )


def submit(state, stream: RequestStream, turn: Turn) -> None:
    """Admit the turn to the engine: KV budget (400/503) and queue (429) checks, then submit."""
    frontend = state.frontend
    n, prompt, params = turn.n, turn.prompt, turn.params
    kv_error = frontend.kv_admission_error(len(prompt), params.max_tokens, n)
    if kv_error == "too_large":
        raise APIError(
            400,
            f"prompt + max_tokens ({(len(prompt) + params.max_tokens) * n} tokens for n={n}) "
            f"exceeds this server's KV budget of {frontend.max_kv_tokens} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if kv_error == "kv_full":
        raise APIError(
            503,
            "the KV cache is full and requests are already waiting for room; retry soon",
            code="kv_cache_full",
            headers={"Retry-After": "2"},
        )
    request = GenerationRequest(
        request_id=stream.id,
        prompt=prompt,
        params=params,
        deliver=stream.deliver,
        n=n,
        stop=turn.stop,
        grammar=turn.grammar,
        adapter=adapter_slot(state, stream.model),
    )
    if not frontend.submit(request):
        raise APIError(
            429,
            f"the queue is full ({state.config.scheduler.max_queue} requests wait already); retry soon",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if state.metrics is not None:
        state.metrics.request_started(len(prompt))


class TurnOutput:
    """Splits one request's engine events into per-choice parts and counts reasoning tokens."""

    def __init__(self, turn: Turn):
        self.parsers = [turn.parser() for _ in range(turn.n)]
        self.reasoning_tokens = 0

    def event(self, token: TokenEvent) -> TurnEvent:
        parser = self.parsers[token.index]
        if parser.in_reasoning:
            self.reasoning_tokens += len(token.token_ids)
        parts = parser.feed(token.text) if token.text else []
        finish = token.finish_reason
        if finish is not None:
            parts += parser.finish()
            if finish == "stop" and parser.made_tool_call:
                finish = "tool_calls"
        return TurnEvent(token.index, token, parts, finish)


async def turn_events(state, stream: RequestStream, turn: Turn, timeout_s: float) -> AsyncIterator[TurnEvent]:
    """The request's events as `TurnEvent`s; `output.reasoning_tokens` is final once this ends."""
    output = stream.output = TurnOutput(turn)
    async for token in stream.events(timeout_s):
        if state.metrics is not None:
            state.metrics.token_event(stream, token)
        yield output.event(token)


def turn_usage(stream: RequestStream) -> dict:
    out = usage(stream.done)
    output = getattr(stream, "output", None)
    out["completion_tokens_details"] = {"reasoning_tokens": output.reasoning_tokens if output else 0}
    return out


def finish(state, stream: RequestStream, outcome: str) -> None:
    """Record the outcome; a request that did not finish is aborted on every rank."""
    if not stream.finished:
        state.frontend.abort(stream.id)
        outcome = "abort" if outcome == "ok" else outcome
    if state.metrics is not None:
        state.metrics.request_finished(stream, outcome)


async def run_until_done(state, request, stream: RequestStream, consume) -> bool:
    """Run `consume()` (which reads the stream to its end) while watching for the client leaving.
    True when the request finished; False when the client went away (the request is aborted)."""
    consumer = asyncio.create_task(consume())
    watcher = asyncio.create_task(_watch_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()  # re-raises an APIError from the engine
    except APIError:
        finish(state, stream, "error")
        raise
    finally:
        consumer.cancel()
        watcher.cancel()
        if not stream.finished:
            finish(state, stream, "abort")
    if stream.finished:
        finish(state, stream, "ok")
    return stream.finished


async def _watch_disconnect(request) -> None:
    """Return once the client has gone. The body is already read, so the next ASGI message is the
    disconnect; `request.is_disconnected()` never sees it behind the BaseHTTPMiddleware."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.25)  # not expected; never spin
