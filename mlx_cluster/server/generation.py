"""From a validated OpenAI request to an engine `GenerationRequest`, and from engine events
back to OpenAI response objects (whole or as stream chunks).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from mlx_cluster.engine.frontend import DoneEvent, ErrorEvent, GenerationRequest, TokenEvent
from mlx_cluster.engine.plan import SamplingParams
from mlx_cluster.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


@dataclass
class Limits:
    context_length: int
    max_prompt_tokens: int
    default_max_tokens: int
    max_tokens_cap: int
    vocab_size: int


def chat_text(tokenizer, req: ChatCompletionRequest, tools: list[dict] | None = None) -> str:
    """Render the chat template (with `tools`, when given) to text; template errors are the client's (400)."""
    try:
        messages = []
        for m in req.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text() or ""}
            for key in ("name", "tool_call_id"):
                if getattr(m, key) is not None:
                    msg[key] = getattr(m, key)
            if m.tool_calls:
                msg["tool_calls"] = [_template_tool_call(c) for c in m.tool_calls]
            messages.append(msg)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    kwargs = dict(req.chat_template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # a Jinja error caused by this request's messages
        raise APIError(400, f"cannot apply the chat template to these messages: {e}", param="messages") from None


def _template_tool_call(call: dict) -> dict:
    """Chat templates expect a call's arguments as a mapping (HF convention); clients send the
    JSON string OpenAI returned. Arguments that are not a JSON object stay as they are."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            return call
        if isinstance(arguments, dict):
            return {**call, "function": {**function, "arguments": arguments}}
    return call


def chat_prompt(tokenizer, req: ChatCompletionRequest) -> list[int]:
    """Render the chat template (tools included) and tokenize."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    return list(tokenizer.encode(chat_text(tokenizer, req, tools), add_special_tokens=False))


def completion_prompt(tokenizer, req: CompletionRequest, vocab_size: int) -> list[int]:
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return list(tokenizer.encode(req.prompt))
    if not req.prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    bad = [t for t in req.prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"prompt token ids must lie in [0, {vocab_size}); got {bad[0]}", param="prompt")
    return list(req.prompt)


def sampling_params(req, prompt_len: int, limits: Limits, eos_ids: set[int]) -> SamplingParams:
    """Apply defaults and limits; a request that cannot fit the context is a 400."""
    if prompt_len > limits.max_prompt_tokens or prompt_len >= limits.context_length:
        cap = min(limits.max_prompt_tokens, limits.context_length - 1)
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, more than the {cap} this server accepts",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    room = limits.context_length - prompt_len
    max_tokens = req.max_new_tokens
    max_param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif max_tokens > limits.max_tokens_cap:
        raise APIError(
            400,
            f"{max_param} is {max_tokens}; this server allows at most {limits.max_tokens_cap}",
            param=max_param,
            code="invalid_value",
        )
    elif max_tokens > room:
        raise APIError(
            400,
            f"this model's context is {limits.context_length} tokens; the prompt uses {prompt_len}, "
            f"so at most {room} can be generated, but {max_param} is {max_tokens}",
            param=max_param,
            code="context_length_exceeded",
        )
    bias = ()
    if req.logit_bias:
        bad = [k for k in req.logit_bias if int(k) >= limits.vocab_size]
        if bad:
            raise APIError(
                400,
                f"logit_bias token {bad[0]} is outside the vocabulary (size {limits.vocab_size})",
                param="logit_bias",
                code="invalid_value",
            )
        bias = tuple(sorted((int(k), float(v)) for k, v in req.logit_bias.items()))
    if isinstance(req, ChatCompletionRequest):
        logprobs, top = req.logprobs, req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return SamplingParams(
        max_tokens=max_tokens,
        seed=seed & 0xFFFFFFFFFFFFFFFF,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        stop_token_ids=() if req.ignore_eos else tuple(sorted(eos_ids)),
        logit_bias=bias,
        logprobs=logprobs,
        top_logprobs=top,
    )


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


class RequestStream:
    """The asyncio end of one request: engine events arrive on a queue via call_soon_threadsafe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: str, model: str):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.kind = kind
        self.model = model
        self.created = int(time.time())
        self.done: DoneEvent | None = None
        self.finished = False
        self.t_start = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.echo = ""  # completions with echo: the prompt's text, sent before the completion
        self.text_offsets: dict[int, int] = {}  # completions logprobs: where each choice's next token starts

    def deliver(self, event) -> None:
        """Called on the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, timeout_s: float):
        """Yield TokenEvents until the DoneEvent; ErrorEvent and timeout become APIError."""
        deadline = self.loop.time() + timeout_s
        while True:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise APIError(
                    504, f"the request did not finish within {timeout_s:.0f} s", type="timeout", code="request_timeout"
                )
            try:
                event = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, ErrorEvent):
                self.finished = True
                # A 503 (the group failed or is stopping) is retryable: say when, as every other 503 does.
                retry = {"Retry-After": "5"} if event.status == 503 else None
                raise APIError(event.status, event.message, code=event.code, headers=retry)
            if isinstance(event, DoneEvent):
                self.done = event
                self.finished = True
                return
            yield event


def make_request(stream: RequestStream, prompt: list[int], params: SamplingParams, req) -> GenerationRequest:
    return GenerationRequest(
        request_id=stream.id, prompt=prompt, params=params, deliver=stream.deliver, n=req.n, stop=req.stop_list
    )


def sse_response(body) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def sse(obj) -> bytes:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def usage(done: DoneEvent) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _byte_level_decoder()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The token's own UTF-8 bytes. A token holding part of a character decodes to U+FFFD, so
    take the bytes from its vocabulary piece instead (byte-level BPE, or SentencePiece <0xNN>)."""
    if "\ufffd" in text:
        try:
            piece = tokenizer.convert_ids_to_tokens(token_id)
        except Exception:  # not a Hugging Face tokenizer: fall back to the decoded text
            piece = None
        if isinstance(piece, str) and piece:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return [int(m.group(1), 16)]
            if all(c in _BYTE_DECODER for c in piece):
                return [_BYTE_DECODER[c] for c in piece]
    return list(text.encode("utf-8"))


def chat_logprobs(tokenizer, entries) -> list[dict]:
    def item(token_id, logprob):
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": token_bytes(tokenizer, token_id, text)}

    return [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]


def completion_logprobs(tokenizer, entries, text_offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for t, lp, top in entries:
        s = tokenizer.decode([t])
        tokens.append(s)
        token_logprobs.append(lp)
        tops.append({tokenizer.decode([i]): v for i, v in top})
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chunk(stream: RequestStream, tokenizer, event: TokenEvent | None, *, first: bool = False, index: int = 0) -> dict:
    """One streaming chunk in the shape of the request's endpoint."""
    if stream.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else {"content": event.text} if event.text else {}
        choice = {
            "index": index if event is None else event.index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": None if event is None else event.finish_reason,
        }
        if event is not None and event.logprobs:
            choice["logprobs"] = {"content": chat_logprobs(tokenizer, event.logprobs)}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": event.index, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
        if event.logprobs:
            start = stream.text_offsets.get(event.index, len(stream.echo))
            logprobs = completion_logprobs(tokenizer, event.logprobs, start)
            stream.text_offsets[event.index] = start + sum(len(t) for t in logprobs["tokens"])
            choice["logprobs"] = logprobs
        obj = "text_completion"
    return {"id": stream.id, "object": obj, "created": stream.created, "model": stream.model, "choices": [choice]}


def echo_chunk(stream: RequestStream, index: int) -> dict:
    """Completions with echo: the prompt's text, as the first chunk of each choice."""
    choice = {"index": index, "text": stream.echo, "logprobs": None, "finish_reason": None}
    return {
        "id": stream.id,
        "object": "text_completion",
        "created": stream.created,
        "model": stream.model,
        "choices": [choice],
    }


def usage_chunk(stream: RequestStream) -> dict:
    obj = "chat.completion.chunk" if stream.kind == "chat" else "text_completion"
    return {
        "id": stream.id,
        "object": obj,
        "created": stream.created,
        "model": stream.model,
        "choices": [],
        "usage": usage(stream.done),
    }


def full_response(stream: RequestStream, tokenizer, choices: list[Choice]) -> dict:
    out = []
    for c in choices:
        if stream.kind == "chat":
            item = {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": chat_logprobs(tokenizer, c.logprobs)} if c.logprobs else None,
                "finish_reason": c.finish_reason,
            }
        else:
            item = {
                "index": c.index,
                "text": stream.echo + c.text,
                "logprobs": completion_logprobs(tokenizer, c.logprobs, len(stream.echo)) if c.logprobs else None,
                "finish_reason": c.finish_reason,
            }
        out.append(item)
    obj = "chat.completion" if stream.kind == "chat" else "text_completion"
    return {
        "id": stream.id,
        "object": obj,
        "created": stream.created,
        "model": stream.model,
        "choices": out,
        "usage": usage(stream.done),
    }
