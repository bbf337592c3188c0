"""Bad requests, unknown fields and vanishing clients against a real single-rank cluster.

Every error must come back in OpenAI's envelope with the right status and param, and none may
crash or wedge the server: the module ends by checking that a normal request still works.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "builtin:tiny"
CONTEXT = 4096  # max_position_embeddings in builtin:tiny's config.json
MSG = [{"role": "user", "content": "hi"}]


def assert_envelope(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=5).json()


def wait_idle(server, timeout_s: float = 5.0) -> float:
    """Seconds until no sequence runs; fails after timeout_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        h = health(server)
        if h["running_sequences"] == 0 and h["queue_depth"] == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    pytest.fail(f"still running after {timeout_s} s: {health(server)}")


# ---- malformed bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "raw",
    [b"{bad json", b"", b'{"messages": [', "\u00e9t\u00e9".encode("latin-1"), b"[" * 100_000],
    ids=["broken", "empty", "truncated", "latin-1", "deeply-nested"],
)
def test_malformed_json_is_a_400_not_a_422(server, path, raw):
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert_envelope(r, 400, code="invalid_json")


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None, True])
def test_non_object_json_body_is_a_400(server, body):
    raw = json.dumps(body).encode()  # httpx's json=None would send no body at all
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_envelope(r, 400, code="invalid_request_body")


# ---- validation ---------------------------------------------------------------------------------

CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [5]}, "messages.0"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 100}, "n"),
    ({"n": "2"}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"2048": 1}}, "logit_bias"),
    ({"seed": "abc"}, "seed"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"chat_template_kwargs": {"tokenize": True}}, "messages"),
]


@pytest.mark.parametrize("fields,param", CHAT_CASES, ids=[p + f"-{i}" for i, (_, p) in enumerate(CHAT_CASES)])
def test_invalid_chat_request_is_a_400_naming_the_param(server, fields, param):
    body = {"messages": MSG, "max_tokens": 2, **fields}
    err = assert_envelope(server.post("/v1/chat/completions", body), 400, param=param)
    assert err["type"] == "invalid_request_error"


COMPLETION_CASES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"logprobs": 50}, "logprobs"),
    ({"echo": "yes"}, "echo"),
]


@pytest.mark.parametrize(
    "fields,param", COMPLETION_CASES, ids=[p + f"-{i}" for i, (_, p) in enumerate(COMPLETION_CASES)]
)
def test_invalid_completion_request_is_a_400_naming_the_param(server, fields, param):
    body = {"prompt": "hello", "max_tokens": 2, **fields}
    assert_envelope(server.post("/v1/completions", body), 400, param=param)


def test_missing_messages_is_a_400(server):
    assert_envelope(server.post("/v1/chat/completions", {"max_tokens": 2}), 400, param="messages")


def test_missing_prompt_is_a_400(server):
    assert_envelope(server.post("/v1/completions", {"max_tokens": 2}), 400, param="prompt")


def test_unknown_model_is_a_404(server):
    for path, body in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "x"})):
        err = assert_envelope(server.post(path, {**body, "model": "gpt-17"}), 404, param="model")
        assert err["code"] == "model_not_found" and "gpt-17" in err["message"]


def test_openai_client_raises_typed_errors(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=MSG)


# ---- context length -------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_context_length_exceeded(server):
    r = server.post("/v1/completions", {"prompt": [5] * (CONTEXT + 10), "max_tokens": 1})
    err = assert_envelope(r, 400, param="prompt", code="context_length_exceeded")
    assert str(CONTEXT + 10) in err["message"]
    # Exactly the context is too long as well: nothing could be generated.
    r = server.post("/v1/completions", {"prompt": [5] * CONTEXT, "max_tokens": 1})
    assert_envelope(r, 400, param="prompt", code="context_length_exceeded")
    long_chat = [{"role": "user", "content": "hello world " * 3000}]
    r = server.post("/v1/chat/completions", {"messages": long_chat, "max_tokens": 1})
    assert_envelope(r, 400, param="messages", code="context_length_exceeded")


def test_max_tokens_that_do_not_fit_the_context_are_rejected(server):
    prompt = [5] * 4000
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 200})
    err = assert_envelope(r, 400, param="max_tokens", code="context_length_exceeded")
    assert "at most 96" in err["message"]  # how many would fit
    r = server.post("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": CONTEXT})
    assert_envelope(r, 400, param="max_completion_tokens", code="context_length_exceeded")
    r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 10**9})
    assert_envelope(r, 400, param="max_tokens")
    # What fits is accepted: a prompt plus max_tokens that fill the context exactly. (Streamed and
    # dropped after the first chunk, so the test does not pay for the generation.)
    body = {"prompt": [5] * 10, "max_tokens": CONTEXT - 10, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: {")
    wait_idle(server)


# ---- routing ----------------------------------------------------------------------------------


def test_unknown_route_and_wrong_method_use_the_envelope(server):
    err = assert_envelope(httpx.post(server.url + "/v1/nope", json={}, timeout=10), 404)
    assert "/v1/nope" in err["message"]
    assert_envelope(httpx.get(server.url + "/nope", timeout=10), 404)
    assert_envelope(httpx.get(server.url + "/v1/chat/completions", timeout=10), 405)
    assert_envelope(httpx.delete(server.url + "/v1/models", timeout=10), 405)
    assert_envelope(httpx.put(server.url + "/v1/completions", json={}, timeout=10), 405)


# ---- unknown fields -----------------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_logged_once(server):
    field = "mystery_knob_7f3a"
    base = server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 4, "temperature": 0})
    for _ in range(2):
        r = server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 4, "temperature": 0, field: {"x": 1}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == base.json()["choices"][0]["message"]
    # A later request with another unknown field logs after any line the first two caused
    # (one process, one stderr): once its line is here, a second line for `field` would be too.
    marker = "marker_knob_9c1d"
    server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 1, marker: 1})
    server.wait_for(lambda: marker in server.output(), 10, "the marker's unknown-field log line")
    lines = [line for line in server.output().splitlines() if field in line]
    assert len(lines) == 1, lines
    assert "ignoring" in lines[0]


# ---- clients that go away -----------------------------------------------------------------------


def test_closed_stream_aborts_the_sequence(server):
    wait_idle(server)
    body = {"messages": MSG, "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # an explicit iterator: leaving a for loop early would close the stream
        data = [line for line in (next(lines) for _ in range(8)) if line.startswith("data: ")]
        assert len(data) == 4
        assert health(server)["running_sequences"] == 1
    # 3000 tokens would take tens of seconds; an abort frees the slot at once.
    assert wait_idle(server, 5.0) < 5.0
    ok = server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 3})
    assert ok.status_code == 200


def test_abandoned_non_streaming_request_is_aborted(server):
    wait_idle(server)
    body = {"messages": MSG, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    assert wait_idle(server, 5.0) < 5.0
    ok = server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 3})
    assert ok.status_code == 200


# ---- still serving ------------------------------------------------------------------------------


def test_server_still_serves_after_all_the_bad_requests(server):
    # Runs last in this module (pytest keeps file order).
    r = server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = server.post("/v1/completions", {"prompt": "hello", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    h = health(server)
    assert h["status"] == "ok" and h["running_sequences"] == 0
    assert "Traceback" not in server.output()
