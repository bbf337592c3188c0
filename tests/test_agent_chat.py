"""Tool calls, enforced structured outputs and reasoning on /v1/chat/completions, driven by the
openai SDK against real clusters (`mlx-cluster up`): two ranks, plus one rank for identity.

builtin:tiny has random weights, so whatever it writes is gibberish: everything that must parse
and validate here does so because the grammar allows nothing else.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

MODEL = "builtin:tiny"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "contact": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"email": {"type": "string", "maxLength": 10}},
                    "required": ["email"],
                    "additionalProperties": False,
                },
                {"type": "null"},
            ]
        },
    },
    "required": ["name", "age", "tags", "contact"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory, models_dir):
    """TP=2 (the cluster under test) and TP=1 (the identity reference), started one after the other."""
    config = {"scheduler": {"max_batch_size": 8}}
    two = Cluster(tmp_path_factory.mktemp("agent2"), ranks=2, models_dir=models_dir, config=config).start()
    try:
        one = Cluster(tmp_path_factory.mktemp("agent1"), ranks=1, models_dir=models_dir, config=config).start()
    except BaseException:
        two.stop()
        raise
    yield two, one
    one.stop()
    two.stop()


@pytest.fixture(scope="module")
def client(clusters):
    return clusters[0].openai()


def check_calls(message, *, names=None) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


# ---- tool calls --------------------------------------------------------------------------------


def test_required_tool_calls_always_parse_and_validate(client):
    for seed in range(6):
        resp = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=seed
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message, names=set(SCHEMAS))
        assert choice.message.content is None


def test_named_tool_choice_calls_exactly_that_function(client):
    for seed in range(3):
        resp = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
            seed=seed,
        )
        [call] = check_calls(resp.choices[0].message, names={"get_time"})
        assert resp.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_makes_one_call(client):
    for seed in range(4):
        resp = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            seed=seed,
        )
        assert len(check_calls(resp.choices[0].message)) == 1


def test_auto_and_none_render_tools_through_the_template(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, seed=1)
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4, seed=1)
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4, seed=1
    )
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tool signatures are in the prompt
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    # The random model does not choose to call a tool on its own: auto leaves it free text.
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"


def test_streamed_tool_call_deltas_reassemble_to_the_same_calls(client):
    body = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=11)
    whole = client.chat.completions.create(**body).choices[0]
    deltas = []
    with client.chat.completions.stream(**body) as stream:
        for event in stream:
            if event.type == "chunk" and event.chunk.choices and event.chunk.choices[0].delta.tool_calls:
                deltas.extend(event.chunk.choices[0].delta.tool_calls)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    got = [(c.function.name, c.function.arguments) for c in final.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    check_calls(final.message)
    # OpenAI's delta shape: index, id and name first, then the arguments in several pieces.
    first, *rest = [d for d in deltas if d.index == 0]
    assert first.id and first.function.name == final.message.tool_calls[0].function.name
    assert len(rest) > 2 and all(d.id is None and d.function.name is None and d.function.arguments for d in rest)


def test_tool_results_round_trip(client):
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        seed=3,
    )
    msg = first.choices[0].message
    [call] = check_calls(msg)
    history = [
        *ASK,
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=6, seed=3)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20  # the call and its result are in the prompt
    assert isinstance(second.choices[0].message.content, str)
    # ... and again with a required call: the loop an agent runs.
    third = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="required", max_tokens=200, seed=4
    )
    check_calls(third.choices[0].message)


# ---- structured outputs ------------------------------------------------------------------------


def test_json_schema_outputs_validate_over_many_seeds_in_one_batch(client):
    """Constrained and free requests run concurrently in one batch; every constrained one validates."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def constrained(seed):
        return client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=fmt, max_tokens=150, seed=seed
        ).choices[0]

    def free(seed):
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, seed=seed).choices[0]

    with ThreadPoolExecutor(12) as pool:
        structured = list(pool.map(constrained, range(10)))
        alone = [free(s) for s in (100, 101)]
        together = [f.result() for f in [pool.submit(free, s) for s in (100, 101)]]
    for choice in structured:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in structured}) > 5
    assert [c.message.content for c in together] == [c.message.content for c in alone]


def test_json_object_and_vllm_extensions(client):
    obj = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=300,
        seed=5,
        extra_body={"min_p": 0.5},  # keeps a random model's keys short
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut by max_tokens inside the object: still a valid prefix of one
        assert obj.choices[0].message.content.startswith("{")
    for seed in range(4):
        choice = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=20, seed=seed, extra_body={"guided_choice": ["yes", "no", "maybe"]}
        ).choices[0]
        assert choice.message.content in {"yes", "no", "maybe"} and choice.finish_reason == "stop"
    regex = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=20,
        seed=1,
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}},
    ).choices[0]
    assert len(regex.message.content) == 6 and regex.message.content[2] == "-"


def test_a_constrained_request_cut_by_max_tokens_ends_cleanly(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    resp = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=3, seed=1)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
    ok = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=150, seed=1)
    jsonschema.validate(json.loads(ok.choices[0].message.content), PERSON)


def test_token_identity_tp1_vs_tp2_under_constraints(clusters):
    two, one = (c.openai() for c in clusters)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in (1, 2):
        a = two.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=120, seed=seed)
        b = one.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=120, seed=seed)
        assert a.choices[0].message.content == b.choices[0].message.content
        body = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=seed)
        a = two.chat.completions.create(**body).choices[0].message.tool_calls
        b = one.chat.completions.create(**body).choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in a] == [
            (c.function.name, c.function.arguments) for c in b
        ]


# ---- reasoning ---------------------------------------------------------------------------------


def test_reasoning_content_is_split_and_counted(client):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=12, seed=2)
    thinking = client.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = thinking.choices[0].message
    # The random model never closes its <think> block: everything it wrote is reasoning.
    assert message.reasoning_content and not message.content
    assert thinking.usage.completion_tokens_details.reasoning_tokens == thinking.usage.completion_tokens == 12
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].message.content and plain.usage.completion_tokens_details.reasoning_tokens == 0
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    chunks = client.chat.completions.create(
        **kwargs, stream=True, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed == message.reasoning_content


# ---- bad input ---------------------------------------------------------------------------------


def bad(client, **body) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **body)
    return e.value


def test_bad_tools_and_schemas_are_400s_naming_the_field(client):
    e = bad(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.body["param"] == "tool_choice" and "nope" in e.body["message"]
    assert bad(client, tool_choice="required").body["param"] == "tool_choice"
    e = bad(client, tools=[{"type": "function", "function": {"name": "has space"}}])
    assert e.body["param"] == "tools.0.function.name"
    e = bad(
        client,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
        tool_choice="required",
    )
    assert e.body["param"] == "tools.0.function.parameters" and "not" in e.body["message"]
    e = bad(
        client,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
        },
    )
    assert e.body["param"] == "response_format.json_schema.schema" and "uniqueItems" in e.body["message"]
    e = bad(client, response_format={"type": "json_schema"})
    assert e.body["param"] == "response_format.json_schema"
    e = bad(client, response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"})
    assert e.body["param"] == "guided_regex"
    assert bad(client, extra_body={"guided_regex": "(?<=a)b"}).body["param"] == "guided_regex"
    assert bad(client, response_format={"type": "yaml"}).body["param"] == "response_format.type"
    huge = {"type": "string", "enum": [f"value-{i:06d}" for i in range(12000)]}  # a grammar over the plan's bound
    e = bad(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": huge}})
    assert e.body["param"] == "response_format.json_schema.schema" and "at most" in e.body["message"]
    # The server is fine afterwards.
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices[0].finish_reason == "length"
