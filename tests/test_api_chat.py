"""/v1/chat/completions against a real single-rank cluster (builtin:tiny, random weights).

The model's text is gibberish but deterministic under greedy decoding, so every check compares
a request with a reference request rather than with fixed strings.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "builtin:tiny"
PROMPT = "Tell me about lists"


def messages(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(server, **body) -> dict:
    body.setdefault("messages", messages())
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def greedy(server, **body) -> dict:
    return chat(server, temperature=0, ignore_eos=True, **body)


def content(resp: dict, index: int = 0) -> str:
    return resp["choices"][index]["message"]["content"]


def sse_events(server, body: dict) -> list[str]:
    """The raw `data:` payloads of a streaming request, in order, checking the SSE framing."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith("data: "), frame
        payloads.append(frame[len("data: ") :])
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    return payloads


def repeats(resp: dict) -> int:
    tokens = [t["token"] for t in resp["choices"][0]["logprobs"]["content"]]
    return len(tokens) - len(set(tokens))


# ---- response shape ----------------------------------------------------------------------


def test_chat_response_has_the_openai_shape(server):
    before = int(time.time())
    resp = chat(server, model=MODEL, temperature=0, max_tokens=8, user="user-123")
    assert resp["id"].startswith("chatcmpl-") and len(resp["id"]) > 12
    assert resp["object"] == "chat.completion"
    assert before - 1 <= resp["created"] <= time.time() + 1
    assert resp["model"] == MODEL
    [choice] = resp["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["logprobs"] is None
    usage = resp["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8


def test_openai_client_parses_a_chat_completion(server):
    client = server.openai()
    resp = client.chat.completions.create(model=MODEL, messages=messages(), temperature=0, max_tokens=6)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # Same greedy request over raw HTTP: same text.
    assert resp.choices[0].message.content == content(chat(server, model=MODEL, temperature=0, max_tokens=6))


# ---- sampling ----------------------------------------------------------------------------


def test_greedy_is_deterministic_and_array_content_equals_string_content(server):
    a = greedy(server, max_tokens=16)
    b = greedy(server, max_tokens=16)
    assert content(a) and content(a) == content(b)
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about lists"}]
    c = greedy(server, max_tokens=16, messages=[{"role": "user", "content": parts}])
    assert c["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
    assert content(c) == content(a)


def test_max_tokens_and_max_completion_tokens_with_ignore_eos(server):
    r = greedy(server, max_tokens=7)
    assert r["usage"]["completion_tokens"] == 7
    assert r["choices"][0]["finish_reason"] == "length"
    r = greedy(server, max_completion_tokens=5)
    assert r["usage"]["completion_tokens"] == 5
    # max_completion_tokens is the newer name and wins over the deprecated max_tokens.
    r = greedy(server, max_tokens=9, max_completion_tokens=3)
    assert r["usage"]["completion_tokens"] == 3


def test_seed_makes_sampling_reproducible(server):
    def sample(seed):
        return content(chat(server, temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True))

    assert sample(11) == sample(11)
    texts = {sample(seed) for seed in (1, 2, 3, 4)}
    assert len(texts) >= 3, texts


def test_restrictive_top_k_top_p_min_p_reduce_to_greedy(server):
    reference = content(greedy(server, max_tokens=12))
    for knob in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        for seed in (1, 2):
            got = content(chat(server, temperature=1.5, seed=seed, max_tokens=12, ignore_eos=True, **knob))
            assert got == reference, knob


def test_a_vanishing_temperature_is_greedy(server):
    reference = content(greedy(server, max_tokens=12))
    for temperature in (1e-20, 1e-40):
        got = content(chat(server, temperature=temperature, seed=9, max_tokens=12, ignore_eos=True))
        assert got == reference, temperature


def test_top_k_samples_only_from_the_k_most_likely_tokens(server):
    # top_logprobs are computed before filtering, so with top_logprobs == top_k they are the candidates.
    for seed in (3, 4):
        resp = chat(
            server, temperature=2.0, seed=seed, top_k=3, max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=3
        )
        for entry in resp["choices"][0]["logprobs"]["content"]:
            candidates = {(t["token"], t["logprob"]) for t in entry["top_logprobs"]}
            assert (entry["token"], entry["logprob"]) in candidates


def test_n_choices_are_indexed_distinct_and_counted(server):
    single = greedy(server, max_tokens=6)
    resp = chat(server, n=3, seed=7, temperature=1.0, max_tokens=6, ignore_eos=True)
    assert sorted(c["index"] for c in resp["choices"]) == [0, 1, 2]
    texts = [c["message"]["content"] for c in resp["choices"]]
    assert len(set(texts)) >= 2, texts
    assert all(c["finish_reason"] == "length" for c in resp["choices"])
    # The prompt is counted once (as OpenAI does), the completions of every choice are summed.
    assert resp["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert resp["usage"]["completion_tokens"] == 18
    again = chat(server, n=3, seed=7, temperature=1.0, max_tokens=6, ignore_eos=True)
    assert [c["message"]["content"] for c in again["choices"]] == texts


# ---- stop strings --------------------------------------------------------------------------


def _stop_string(text: str) -> tuple[str, str]:
    """A 3-character stop string that first occurs well inside `text`, and the text cut before it."""
    for start in range(4, len(text) - 3):
        stop = text[start : start + 3]
        if "\ufffd" not in stop and stop.strip() and text.find(stop) == start:
            return stop, text[:start]
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_cuts_the_text_and_is_never_emitted(server):
    full = content(greedy(server, max_tokens=24))
    stop, expected = _stop_string(full)
    for stop_field in (stop, ["never-appears-1", stop]):
        resp = greedy(server, max_tokens=24, stop=stop_field)
        assert content(resp) == expected
        assert stop not in content(resp)
        assert resp["choices"][0]["finish_reason"] == "stop"
        assert resp["usage"]["completion_tokens"] < 24
    # Streaming: the deltas add up to the same cut text; no delta carries the stop string.
    payloads = sse_events(
        server,
        {"messages": messages(), "temperature": 0, "ignore_eos": True, "max_tokens": 24, "stop": stop, "stream": True},
    )
    chunks = [json.loads(p) for p in payloads[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert "".join(deltas) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---- streaming -----------------------------------------------------------------------------


def test_stream_deltas_equal_the_non_stream_text(server):
    reference = greedy(server, max_tokens=16)
    client = server.openai()
    stream = client.chat.completions.create(
        model=MODEL, messages=messages(), temperature=0, max_tokens=16, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == content(reference)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_stream_wire_format_and_include_usage(server):
    body = {"messages": messages(), "temperature": 0, "max_tokens": 5, "ignore_eos": True, "stream": True}
    plain = [json.loads(p) for p in sse_events(server, body)[:-1]]
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"] and "usage" not in c for c in plain), "usage only when asked for"

    asked = [json.loads(p) for p in sse_events(server, {**body, "stream_options": {"include_usage": True}})[:-1]]
    usage_chunks = [c for c in asked if c.get("usage")]
    assert len(usage_chunks) == 1
    assert asked[-1] is usage_chunks[0], "the usage chunk is the last before [DONE]"
    assert asked[-1]["choices"] == []
    assert asked[-1]["usage"]["completion_tokens"] == 5
    assert asked[-1]["usage"]["total_tokens"] == asked[-1]["usage"]["prompt_tokens"] + 5
    assert all(c["choices"] for c in asked[:-1])
    text = lambda cs: "".join(c["choices"][0]["delta"].get("content") or "" for c in cs if c["choices"])  # noqa: E731
    assert text(asked) == text(plain)

    client = server.openai()
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages(),
            temperature=0,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_with_n_sends_a_role_chunk_per_choice(server):
    body = {
        "messages": messages(),
        "n": 2,
        "seed": 3,
        "temperature": 1.0,
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
    }
    chunks = [json.loads(p) for p in sse_events(server, body)[:-1]]
    roles = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role"))
    assert roles == [0, 1]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1]
    nonstream = chat(server, **{k: v for k, v in body.items() if k != "stream"})
    for index in (0, 1):
        streamed = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == index
        )
        assert streamed == content(nonstream, index)


# ---- logprobs ------------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(server):
    resp = greedy(server, max_tokens=8, logprobs=True, top_logprobs=3)
    entries = resp["choices"][0]["logprobs"]["content"]
    assert len(entries) == resp["usage"]["completion_tokens"] == 8
    for entry in entries:
        assert isinstance(entry["token"], str)
        assert entry["logprob"] <= 0.0
        assert all(isinstance(b, int) and 0 <= b < 256 for b in entry["bytes"])
        if "\ufffd" not in entry["token"]:
            assert bytes(entry["bytes"]).decode() == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        # Greedy: the sampled token is the most likely one, with the same logprob.
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
    # The tokens' bytes spell the text (a token may hold part of a UTF-8 character).
    raw = b"".join(bytes(e["bytes"]) for e in entries)
    assert raw.decode("utf-8", "replace").lstrip(" ") == content(resp)

    plain = greedy(server, max_tokens=8, logprobs=True)
    assert [e["token"] for e in plain["choices"][0]["logprobs"]["content"]] == [e["token"] for e in entries]
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


def test_sampled_logprob_matches_its_top_logprobs_entry(server):
    resp = chat(server, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=5)
    for entry in resp["choices"][0]["logprobs"]["content"]:
        for t in entry["top_logprobs"]:
            if t["token"] == entry["token"] and t["bytes"] == entry["bytes"]:
                assert t["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)


def test_streamed_logprobs_match_the_non_stream_ones(server):
    reference = greedy(server, max_tokens=6, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    body = {
        "messages": messages(),
        "temperature": 0,
        "ignore_eos": True,
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
    }
    chunks = [json.loads(p) for p in sse_events(server, body)[:-1]]
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == reference


# ---- penalties and bias -------------------------------------------------------------------


def test_penalties_change_greedy_output_and_reduce_repeats(server):
    base = greedy(server, max_tokens=32, logprobs=True)
    assert repeats(base) >= 3, "the reference needs repeats for this test to mean anything"
    for knob in ({"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        resp = greedy(server, max_tokens=32, logprobs=True, **knob)
        assert content(resp) != content(base), knob
        assert repeats(resp) < repeats(base), knob
    # Neutral values are the same as none.
    neutral = greedy(server, max_tokens=32, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    assert content(neutral) == content(base)


def test_logit_bias_forces_a_token(server):
    base = greedy(server, max_tokens=6, logprobs=True)
    forced = greedy(server, max_tokens=6, logit_bias={"300": 100}, logprobs=True)
    tokens = [e["token"] for e in forced["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == 6 and len(set(tokens)) == 1
    assert content(forced) == tokens[0] * 6
    assert content(forced) != content(base)


def test_user_and_chat_template_kwargs_are_accepted(server):
    base = greedy(server, max_tokens=8)
    resp = greedy(server, max_tokens=8, user="alice", chat_template_kwargs={"enable_thinking": False})
    assert content(resp) == content(base)


# ---- batching ------------------------------------------------------------------------------


async def _stream_times(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[str, list[float]]:
    body = {"messages": messages(prompt), "temperature": 0, "max_tokens": 32, "ignore_eos": True, "stream": True}
    text, times = "", []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if "role" in choice["delta"]:
                continue
            times.append(time.monotonic())
            text += choice["delta"].get("content") or ""
    return text, times


def test_concurrent_streams_share_the_batch_and_match_their_solo_output(server):
    prompts = [f"request {i}: {'tell me about ' * (i % 3)}dicts and sets" for i in range(8)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            alone = [(await _stream_times(client, server.url, p))[0] for p in prompts]
            together = await asyncio.gather(*(_stream_times(client, server.url, p) for p in prompts))
        return alone, together

    alone, together = asyncio.run(run())
    firsts = [times[0] for _, times in together]
    lasts = [times[-1] for _, times in together]
    assert all(len(times) == 32 for _, times in together)
    # Continuous batching: every request produced its first token before any request finished.
    assert max(firsts) < min(lasts)
    # Batching does not change what a request gets (greedy; prompts of different lengths, so padded).
    assert [text for text, _ in together] == alone
