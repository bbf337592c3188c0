"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) driven by the anthropic SDK
against a two-rank cluster: text, stop sequences, tools (any / tool / auto / none), tool results,
thinking, streams reassembled by the SDK's own helper, errors in Anthropic's envelope."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
from fastapi.testclient import TestClient

from mlx_cluster.config import ClusterConfig
from mlx_cluster.server.app import ServerState, create_app

MODEL = "builtin:tiny"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
    {"name": "get_time", "description": "Time in a zone", "input_schema": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}  # this SDK no longer sends sampling fields; the server still takes them


@pytest.fixture(scope="module")
def client(cluster2):
    return anthropic.Anthropic(base_url=cluster2.url, api_key="none", max_retries=0, timeout=120)


def tool_uses(message) -> list:
    uses = [b for b in message.content if b.type == "tool_use"]
    for b in uses:
        assert b.id.startswith("toolu_")
        jsonschema.validate(b.input, SCHEMAS[b.name])
    return uses


@pytest.mark.slow
def test_text_message_matches_chat_completions(client, cluster2):
    msg = client.messages.create(model=MODEL, max_tokens=8, system="Be brief.", messages=ASK, extra_body=GREEDY)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 8
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10
    [block] = msg.content
    chat = cluster2.openai().chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "system", "content": "Be brief."}, *ASK]
    )
    assert block.type == "text" and block.text == chat.choices[0].message.content
    count = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=ASK)
    assert count.input_tokens == chat.usage.prompt_tokens


@pytest.mark.slow
def test_stop_sequences_are_reported(client):
    full = client.messages.create(model=MODEL, max_tokens=16, messages=ASK, extra_body=GREEDY)
    text = full.content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.messages.create(model=MODEL, max_tokens=16, messages=ASK, stop_sequences=[stop], extra_body=GREEDY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert text.startswith(cut.content[0].text) and stop not in cut.content[0].text


@pytest.mark.slow
def test_tool_choice_any_and_tool_are_enforced(client):
    for temperature in (0.7, 1.0):
        msg = client.messages.create(
            model=MODEL,
            max_tokens=200,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "any"},
            extra_body={"temperature": temperature},
        )
        assert msg.stop_reason == "tool_use" and tool_uses(msg)
    msg = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
    )
    [use] = tool_uses(msg)
    assert use.name == "get_time" and msg.stop_reason == "tool_use"
    none = client.messages.create(model=MODEL, max_tokens=4, messages=ASK, tools=TOOLS, tool_choice={"type": "none"})
    assert [b.type for b in none.content] == ["text"] and none.stop_reason == "max_tokens"


@pytest.mark.slow
def test_tool_results_round_trip(client):
    first = client.messages.create(
        model=MODEL, max_tokens=200, messages=ASK, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}
    )
    [use] = tool_uses(first)
    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "21 C, sunny"}]},
                {"type": "text", "text": "Thanks! And the time?"},
            ],
        },
    ]
    second = client.messages.create(
        model=MODEL, max_tokens=200, messages=history, tools=TOOLS, tool_choice={"type": "any"}
    )
    tool_uses(second)
    prompt_len = second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert prompt_len > first.usage.input_tokens + first.usage.cache_read_input_tokens + 20


@pytest.mark.slow
def test_streams_reassemble_with_the_sdk_helper(client):
    body = dict(model=MODEL, max_tokens=200, messages=ASK, tools=TOOLS, tool_choice={"type": "any"}, extra_body=GREEDY)
    whole = client.messages.create(**body)
    events = []
    with client.messages.stream(**body) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in tool_uses(final)] == [(b.name, b.input) for b in tool_uses(whole)]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "input_json" in events and events.count("content_block_start") == events.count("content_block_stop")
    # A text stream, through the helper's text_stream.
    body = dict(model=MODEL, max_tokens=10, messages=ASK, extra_body=GREEDY)
    with client.messages.stream(**body) as stream:
        text = "".join(stream.text_stream)
    assert text == client.messages.create(**body).content[0].text


@pytest.mark.slow
def test_structured_output_config_and_strict_tools(client):
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    for _ in range(3):
        msg = client.messages.create(
            model=MODEL,
            max_tokens=80,
            messages=ASK,
            output_config={"format": {"type": "json_schema", "schema": person}},
        )
        assert msg.stop_reason == "end_turn"
        jsonschema.validate(json.loads(msg.content[0].text), person)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=ASK,
            output_config={"format": {"type": "json_schema", "schema": {"type": "string", "format": "zodiac"}}},
        )
    assert "output_config.format.schema" in e.value.body["error"]["message"]
    strict = [{**TOOLS[0], "strict": True}]
    msg = client.messages.create(
        model=MODEL, max_tokens=200, messages=ASK, tools=strict, tool_choice={"type": "any"}, extra_body=GREEDY
    )
    assert msg.stop_reason == "tool_use"
    tool_uses(msg)
    # Sampled calls are grammar-bound too. One in ~40 used to break (`{"name": "get_weather", stack`):
    # the sampler's noise could be +inf (engine/decode.py `_uniform`, test_output_units.py).
    for _ in range(4):
        msg = client.messages.create(
            model=MODEL, max_tokens=200, messages=ASK, tools=strict, tool_choice={"type": "any"}
        )
        assert msg.stop_reason == "tool_use"
        tool_uses(msg)


@pytest.mark.slow
def test_thinking_blocks(client):
    body = dict(model=MODEL, max_tokens=10, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024})
    msg = client.messages.create(**body, extra_body=GREEDY)
    assert [b.type for b in msg.content] == ["thinking"] and msg.content[0].thinking  # never closes its <think>
    with client.messages.stream(**body, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == msg.content[0].thinking


@pytest.mark.slow
def test_errors_use_anthropics_envelope(client, cluster2):
    cases = [
        dict(model=MODEL, max_tokens=5, messages=ASK, extra_body={"temperature": 1.5}),
        dict(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
        dict(model=MODEL, max_tokens=5, messages=ASK, tools=TOOLS, tool_choice={"type": "tool", "name": "nope"}),
        dict(
            model=MODEL,
            max_tokens=5,
            messages=ASK,
            tools=[{"name": "f", "input_schema": {"not": {}}}],
            tool_choice={"type": "any"},
        ),
    ]
    for body in cases:
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(**body)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "tools.0.input_schema" in str(e.value)
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nope", max_tokens=5, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    r = cluster2.post("/v1/messages", {"model": MODEL, "messages": ASK})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]


def test_x_api_key_is_accepted_and_errors_keep_anthropics_envelope():
    state = ServerState(config=ClusterConfig(), api_keys=("sk-secret",))
    app = TestClient(create_app(state))
    body = {"model": MODEL, "max_tokens": 4, "messages": ASK}
    r = app.post("/v1/messages", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.json()["type"] == "error"
    r = app.post("/v1/messages", json=body, headers={"x-api-key": "sk-secret"})
    assert r.status_code == 503 and r.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the model is still loading"},
    }
    r = app.post("/v1/chat/completions", json={"messages": ASK}, headers={"x-api-key": "sk-secret"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading"  # OpenAI's envelope there
    r = app.post("/v1/messages/count_tokens", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert json.loads(app.get("/openapi.json").text)["paths"]["/v1/messages"]
