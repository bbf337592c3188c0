"""Units without a server: request validation (server/protocol.py) and the request/response
mapping (server/generation.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mlx_cluster.engine.frontend import DoneEvent, ErrorEvent, TokenEvent
from mlx_cluster.server.generation import (
    Limits,
    RequestStream,
    chat_prompt,
    chunk,
    completion_logprobs,
    completion_prompt,
    sampling_params,
    token_bytes,
)
from mlx_cluster.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    parse_request,
)

MSG = [{"role": "user", "content": "hi"}]
LIMITS = Limits(context_length=100, max_prompt_tokens=60, default_max_tokens=30, max_tokens_cap=80, vocab_size=50)


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"messages": MSG, **fields})


def bad(model_cls, data) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(model_cls, data)
    assert e.value.status == 400
    return e.value


# ---- the envelope ----------------------------------------------------------------------------


def test_error_envelope_shape_and_types():
    err = APIError(400, "nope", param="n", code="invalid_value")
    assert err.body() == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}
    }
    assert APIError(404, "x").type == "not_found_error"
    assert APIError(429, "x").type == "rate_limit_error"
    assert APIError(500, "x").type == "server_error"
    assert APIError(503, "x", headers={"Retry-After": "5"}).headers == {"Retry-After": "5"}


# ---- validation ------------------------------------------------------------------------------


def test_minimal_chat_request_and_defaults():
    req = chat()
    assert req.n == 1 and req.stream is False and req.logprobs is False
    assert req.max_new_tokens is None and req.stop_list == []
    assert req.messages[0].text() == "hi"


@pytest.mark.parametrize("data", [[], "x", 3, None, [MSG]])
def test_a_body_that_is_not_an_object_is_rejected(data):
    assert bad(ChatCompletionRequest, data).code == "invalid_request_body"


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages.0.content"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"1": 100.5}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"seed": 2**64}, "seed"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_invalid_fields_name_their_param(fields, param):
    err = bad(ChatCompletionRequest, {"messages": MSG, **fields})
    assert err.param == param
    assert err.message.startswith(param + ": ")
    assert err.code == "invalid_value"


def test_valid_edge_values_are_accepted():
    req = chat(temperature=0, top_p=1, top_k=-1, min_p=0, n=16, seed=-1, stop="x", logit_bias={"0": -100, "7": 100})
    assert req.stop_list == ["x"] and req.temperature == 0.0
    assert chat(stop=["a", "b"]).stop_list == ["a", "b"]
    assert chat(logprobs=True, top_logprobs=0).top_logprobs == 0
    assert chat(max_tokens=5, max_completion_tokens=3).max_new_tokens == 3
    assert chat(temperature=None).temperature is None  # null means the default


def test_completion_prompt_forms():
    assert parse_request(CompletionRequest, {"prompt": "a"}).prompt == "a"
    assert parse_request(CompletionRequest, {"prompt": ["a"]}).prompt == "a"
    assert parse_request(CompletionRequest, {"prompt": [1, 2]}).prompt == [1, 2]
    assert parse_request(CompletionRequest, {"prompt": [[1, 2]]}).prompt == [1, 2]
    assert "batched" in bad(CompletionRequest, {"prompt": ["a", "b"]}).message
    assert bad(CompletionRequest, {"prompt": []}).param == "prompt"
    assert bad(CompletionRequest, {"prompt": 3}).param == "prompt"
    assert bad(CompletionRequest, {}).param == "prompt"
    assert bad(CompletionRequest, {"prompt": "a", "logprobs": 21}).param == "logprobs"


def test_array_content_joins_text_parts_and_refuses_others():
    m = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert m.text() == "ab"
    m = ChatMessage.model_validate({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})
    with pytest.raises(ValueError, match="image_url"):
        m.text()


def test_unknown_fields_are_kept_out_and_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="mlx_cluster.server.protocol")
    for _ in range(3):
        req = parse_request(ChatCompletionRequest, {"messages": MSG, "zz_unit_field": 1, "zz_other": {}})
        assert req.unknown_fields() == ["zz_other", "zz_unit_field"]
    lines = [r.getMessage() for r in caplog.records if "zz_unit_field" in r.getMessage()]
    assert len(lines) == 1 and "zz_other" in lines[0]


# ---- prompts -----------------------------------------------------------------------------------


class Tok:
    eos_token_ids = {0}

    def __init__(self):
        self.rendered = None

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kwargs):
        if kwargs.get("explode"):
            raise ValueError("template says no")
        self.rendered = (messages, kwargs)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 50 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_chat_prompt_renders_roles_parts_and_kwargs():
    tok = Tok()
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        chat_template_kwargs={"enable_thinking": False},
    )
    ids = chat_prompt(tok, req)
    messages, kwargs = tok.rendered
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "ab"
    assert kwargs == {"enable_thinking": False}
    assert ids == tok.encode("system:be brief|user:ab")


def test_chat_prompt_errors_are_the_clients():
    req = chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])
    assert pytest.raises(APIError, chat_prompt, Tok(), req).value.param == "messages"
    err = pytest.raises(APIError, chat_prompt, Tok(), chat(chat_template_kwargs={"explode": True})).value
    assert err.status == 400 and "template says no" in err.message


def test_completion_prompt_checks_token_ids():
    tok = Tok()
    assert completion_prompt(tok, parse_request(CompletionRequest, {"prompt": [1, 49]}), 50) == [1, 49]
    err = pytest.raises(APIError, completion_prompt, tok, parse_request(CompletionRequest, {"prompt": [50]}), 50).value
    assert err.param == "prompt" and err.status == 400
    err = pytest.raises(APIError, completion_prompt, tok, parse_request(CompletionRequest, {"prompt": ""}), 50).value
    assert err.param == "prompt"


# ---- sampling parameters and limits ------------------------------------------------------------


def test_prompt_limits_use_the_smaller_of_context_and_max_prompt_tokens():
    assert sampling_params(chat(), 60, LIMITS, {0}).max_tokens == 30
    err = pytest.raises(APIError, sampling_params, chat(), 61, LIMITS, {0}).value
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert "60" in err.message
    roomy = Limits(context_length=100, max_prompt_tokens=1000, default_max_tokens=30, max_tokens_cap=80, vocab_size=50)
    assert sampling_params(chat(), 99, roomy, {0}).max_tokens == 1  # default capped by the room left
    err = pytest.raises(APIError, sampling_params, chat(), 100, roomy, {0}).value
    assert err.code == "context_length_exceeded"
    completion = parse_request(CompletionRequest, {"prompt": "x"})
    assert pytest.raises(APIError, sampling_params, completion, 100, roomy, {0}).value.param == "prompt"


def test_max_tokens_must_fit_the_context_and_the_cap():
    assert sampling_params(chat(max_tokens=50), 50, LIMITS, {0}).max_tokens == 50
    err = pytest.raises(APIError, sampling_params, chat(max_tokens=51), 50, LIMITS, {0}).value
    assert (err.code, err.param) == ("context_length_exceeded", "max_tokens")
    assert "at most 50" in err.message
    err = pytest.raises(APIError, sampling_params, chat(max_completion_tokens=51), 50, LIMITS, {0}).value
    assert err.param == "max_completion_tokens"
    err = pytest.raises(APIError, sampling_params, chat(max_tokens=81), 1, LIMITS, {0}).value
    assert err.param == "max_tokens" and "80" in err.message


def test_sampling_defaults_and_mapping():
    p = sampling_params(chat(), 5, LIMITS, {0, 7})
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.stop_token_ids == (0, 7)
    assert 0 <= p.seed < 2**64
    assert sampling_params(chat(), 5, LIMITS, {0}).seed != p.seed  # a fresh seed when none is given
    p = sampling_params(chat(ignore_eos=True, seed=-1, top_k=-1, temperature=0), 5, LIMITS, {0})
    assert p.stop_token_ids == () and p.seed == 2**64 - 1 and p.top_k == 0 and p.greedy
    p = sampling_params(chat(logprobs=True, top_logprobs=4, logit_bias={"9": 5, "3": -1}), 5, LIMITS, {0})
    assert p.logprobs and p.top_logprobs == 4 and p.logit_bias == ((3, -1.0), (9, 5.0))
    p = sampling_params(parse_request(CompletionRequest, {"prompt": "x", "logprobs": 0}), 5, LIMITS, {0})
    assert p.logprobs and p.top_logprobs == 0
    assert not sampling_params(parse_request(CompletionRequest, {"prompt": "x"}), 5, LIMITS, {0}).logprobs


def test_logit_bias_outside_the_vocabulary_is_rejected():
    err = pytest.raises(APIError, sampling_params, chat(logit_bias={"50": 1}), 5, LIMITS, {0}).value
    assert err.param == "logit_bias" and "50" in err.message


# ---- responses ---------------------------------------------------------------------------------


class PieceTok:
    """decode() like a byte-level BPE: a lone continuation byte decodes to U+FFFD."""

    pieces = {1: "Ã", 2: "©", 3: "<0xE2>", 4: "hi", 5: "Ġthere"}

    def decode(self, ids):
        return {1: "\ufffd", 2: "\ufffd", 3: "\ufffd", 4: "hi", 5: " there"}[ids[0]]

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]


def test_token_bytes_recover_partial_characters():
    tok = PieceTok()
    assert token_bytes(tok, 1, "\ufffd") + token_bytes(tok, 2, "\ufffd") == list("é".encode())
    assert token_bytes(tok, 3, "\ufffd") == [0xE2]
    assert token_bytes(tok, 4, "hi") == list(b"hi")
    assert token_bytes(tok, 5, " there") == list(b" there")


def test_completion_logprob_offsets():
    tok = PieceTok()
    lp = completion_logprobs(tok, [(4, -0.1, ((4, -0.1),)), (5, -0.2, ())], 3)
    assert lp["tokens"] == ["hi", " there"]
    assert lp["text_offset"] == [3, 5]
    assert lp["top_logprobs"] == [{"hi": -0.1}, {}]


def test_streamed_completion_offsets_continue_across_chunks():
    loop = asyncio.new_event_loop()
    try:
        stream = RequestStream(loop, "completions", "m")
        tok = PieceTok()
        first = chunk(stream, tok, TokenEvent(0, "hi", [4], [(4, -0.1, ())], None, 0.0))
        second = chunk(stream, tok, TokenEvent(0, " there", [5], [(5, -0.2, ())], "length", 0.0))
        other = chunk(stream, tok, TokenEvent(1, " there", [5], [(5, -0.2, ())], None, 0.0))
    finally:
        loop.close()
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
    assert other["choices"][0]["logprobs"]["text_offset"] == [0]  # each choice counts on its own
    assert second["choices"][0]["finish_reason"] == "length"


def test_request_stream_turns_engine_events_into_results():
    async def run(events):
        stream = RequestStream(asyncio.get_running_loop(), "chat", "m")
        for e in events:
            stream.deliver(e)
        got = [e async for e in stream.events(5)]
        return stream, got

    token = TokenEvent(0, "a", [1], [], None, 0.0)
    stream, got = asyncio.run(run([token, DoneEvent(3, 1, 0, 0.0)]))
    assert got == [token] and stream.finished and stream.done.prompt_tokens == 3
    with pytest.raises(APIError) as e:
        asyncio.run(run([token, ErrorEvent("boom", 500, "internal_error")]))
    assert e.value.status == 500 and e.value.code == "internal_error" and e.value.type == "server_error"
    assert "Retry-After" not in e.value.headers  # a 500 is not worth retrying blindly
    # The group failed under the request (benchmarks/chaos.py found these without Retry-After):
    # a 503 says when to come back, as the server's other 503s do.
    with pytest.raises(APIError) as e:
        asyncio.run(run([ErrorEvent("the cluster stopped serving", 503, "engine_unavailable")]))
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}

    async def silent():
        stream = RequestStream(asyncio.get_running_loop(), "chat", "m")
        return [e async for e in stream.events(0.05)]

    with pytest.raises(APIError) as e:
        asyncio.run(silent())
    assert e.value.status == 504


def test_a_failure_mid_stream_ends_the_sse_body_with_an_error_chunk():
    import json
    from types import SimpleNamespace

    from mlx_cluster.server.app import stream_events

    aborted = []
    state = SimpleNamespace(tokenizer=PieceTok(), metrics=None, frontend=SimpleNamespace(abort=aborted.append))
    req = chat(stream=True)

    async def run():
        stream = RequestStream(asyncio.get_running_loop(), "chat", "m")
        stream.deliver(TokenEvent(0, "hi", [4], [], None, 0.0))
        stream.deliver(ErrorEvent("generation failed: boom", 500, "internal_error"))
        return [frame async for frame in stream_events(state, stream, req, 5, include_usage=True)]

    frames = [f.decode() for f in asyncio.run(run())]
    assert all(f.startswith("data: ") and f.endswith("\n\n") for f in frames)
    assert frames[-1] == "data: [DONE]\n\n"
    role, token, error = (json.loads(f[6:]) for f in frames[:-1])
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert token["choices"][0]["delta"] == {"content": "hi"}
    assert error == {
        "error": {"message": "generation failed: boom", "type": "server_error", "param": None, "code": "internal_error"}
    }
    assert aborted == []  # the engine already ended it; nothing to abort
