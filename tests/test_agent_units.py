"""Units below the API surfaces: grammars and token masks (constrain/), the plan's grammar field,
and the output parser that splits reasoning, answer text and tool calls (agent/).

The grammar tests sample from the masks with a seeded numpy generator, i.e. a random-weight
model at its worst: whatever it picks among the allowed tokens, the output must parse and
validate.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from mlx_cluster.agent.formats import load_tool_format, resolve_reasoning_format, resolve_tool_format
from mlx_cluster.agent.output import Content, OutputParser, Reasoning, ToolCall, collect
from mlx_cluster.constrain import (
    Answer,
    ConstraintSpec,
    GrammarCompiler,
    GrammarError,
    Tool,
    ToolSyntax,
    make_constraint,
)
from mlx_cluster.engine.plan import (
    MAX_GRAMMAR_BYTES,
    NewSequence,
    PlanDecodeError,
    SamplingParams,
    StepPlan,
    decode_plan,
    encode_plan,
)

VOCAB = 2048
HERMES = ToolSyntax("hermes", "<tool_call>", "</tool_call>")
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
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["items", "express", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from mlx_lm.tokenizer_utils import load

    return load(Path(tiny_model_path))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB)


def sample(grammar: str, tokenizer, seed: int, max_tokens: int = 200, forced: list[int] = ()) -> tuple[list[int], str]:
    """Pick uniformly among the allowed tokens until end-of-sequence (or forced tokens first)."""
    constraint = make_constraint(grammar, tokenizer, VOCAB)
    rng = np.random.default_rng(seed)
    tokens = []
    eos = set(tokenizer.eos_token_ids)
    for i in range(max_tokens):
        mask = constraint.allowed_tokens()
        allowed = np.arange(VOCAB) if mask is None else np.flatnonzero(mask)
        token = forced[i] if i < len(forced) else int(rng.choice(allowed))
        constraint.consume(token)
        if token in eos:
            assert constraint.finished
            return tokens, tokenizer.decode(tokens)
        tokens.append(token)
    raise AssertionError(f"no end of sequence after {max_tokens} tokens: {tokenizer.decode(tokens)!r}")


# ---- the plan carries the grammar -----------------------------------------------------------


def test_plan_carries_the_grammar_to_every_rank():
    params = SamplingParams(max_tokens=4, seed=1)
    seq = NewSequence(3, (1, 2), params, grammar='start: "ok" | "caf\\u00e9 ☕"')
    plan = StepPlan(step=9, new=(seq, NewSequence(4, (5,), params)))
    assert decode_plan(encode_plan(plan)) == plan
    assert decode_plan(encode_plan(plan)).new[1].grammar == ""


def test_plan_decoder_bounds_the_grammar():
    params = SamplingParams(max_tokens=4, seed=1)
    big = encode_plan(StepPlan(step=1, new=(NewSequence(1, (1,), params, grammar="x" * (MAX_GRAMMAR_BYTES + 1)),)))
    with pytest.raises(PlanDecodeError, match="grammar bytes"):
        decode_plan(big)
    good = encode_plan(StepPlan(step=1, new=(NewSequence(1, (1,), params, grammar="ab"),)))
    bad = good.replace(b"ab", b"\xff\xfe")
    with pytest.raises(PlanDecodeError, match="UTF-8"):
        decode_plan(bad)


# ---- grammars -----------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [WEATHER, ORDER], ids=["weather", "order"])
def test_json_schema_outputs_validate_over_many_seeds(compiler, tokenizer, schema):
    grammar = compiler.compile(ConstraintSpec(answer=Answer("json", schema=schema)))
    for seed in range(25):
        _, text = sample(grammar, tokenizer, seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_choice_and_regex(compiler, tokenizer):
    grammar = compiler.compile(ConstraintSpec(answer=Answer("choice", choices=("yes", 'no "way"', "peut-être"))))
    assert {sample(grammar, tokenizer, s)[1] for s in range(30)} == {"yes", 'no "way"', "peut-être"}
    grammar = compiler.compile(ConstraintSpec(answer=Answer("regex", pattern=r"[0-9]{3}/[a-c]{2}")))
    for seed in range(5):
        text = sample(grammar, tokenizer, seed)[1]
        assert len(text) == 6 and text[:3].isdigit() and text[3] == "/" and set(text[4:]) <= set("abc")
    grammar = compiler.compile(
        ConstraintSpec(
            answer=Answer("json", schema={"type": "object", "properties": {}, "additionalProperties": False})
        )
    )
    assert sample(grammar, tokenizer, 0)[1] == "{}"


def test_unenforceable_schemas_are_errors_naming_the_field(compiler):
    cases = [
        (Answer("json", schema={"not": {"type": "string"}}, param="response_format.json_schema.schema"), "not"),
        (Answer("json", schema={"type": "array", "uniqueItems": True}, param="guided_json"), "uniqueItems"),
        (Answer("json", schema={"type": "string", "format": "zodiac"}, param="guided_json"), "zodiac"),
        (Answer("json", schema={"$ref": "#/$defs/missing"}, param="guided_json"), "missing"),
        (Answer("regex", pattern="a(?=b)", param="guided_regex"), "look-around"),
    ]
    for answer, word in cases:
        with pytest.raises(GrammarError) as e:
            compiler.compile(ConstraintSpec(answer=answer))
        assert e.value.param == answer.param and word in str(e.value)
    bad_tool = Tool("f", {"type": "object", "properties": {"a": {"not": {}}}}, param="tools.1.function.parameters")
    with pytest.raises(GrammarError) as e:
        compiler.compile(ConstraintSpec(tools=(bad_tool,), tool_mode="required", syntax=HERMES))
    assert e.value.param == "tools.1.function.parameters"


def tool_calls(text: str, tokenizer) -> list[dict]:
    parser = OutputParser(tools=resolve_tool_format("auto", tokenizer))
    reasoning, content, calls = collect(parser.feed(text) + parser.finish())
    assert content == "" and reasoning == ""
    return calls


def test_required_tool_calls_parse_and_validate(compiler, tokenizer):
    tools = (Tool("get_weather", WEATHER), Tool("place_order", ORDER))
    grammar = compiler.compile(ConstraintSpec(tools=tools, tool_mode="required", syntax=HERMES, parallel=True))
    names = set()
    for seed in range(20):
        tokens, text = sample(grammar, tokenizer, seed, max_tokens=3000)
        assert tokens[0] == tokenizer.convert_tokens_to_ids("<tool_call>")  # the marker token, as trained
        calls = tool_calls(text, tokenizer)
        assert calls
        for call in calls:
            name = call["function"]["name"]
            names.add(name)
            schema = WEATHER if name == "get_weather" else ORDER
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert names == {"get_weather", "place_order"}


def test_named_tool_choice_makes_exactly_one_call(compiler, tokenizer):
    grammar = compiler.compile(
        ConstraintSpec(tools=(Tool("get_weather", WEATHER),), tool_mode="required", syntax=HERMES, parallel=False)
    )
    for seed in range(10):
        [call] = tool_calls(sample(grammar, tokenizer, seed)[1], tokenizer)
        assert call["function"]["name"] == "get_weather"


def test_mistral_tool_syntax(compiler, tokenizer):
    syntax = ToolSyntax("mistral", "[TOOL_CALLS]")
    grammar = compiler.compile(
        ConstraintSpec(tools=(Tool("get_weather", WEATHER),), tool_mode="required", syntax=syntax)
    )
    fmt = load_tool_format("mistral")
    for seed in range(5):
        text = sample(grammar, tokenizer, seed, max_tokens=400)[1]
        parser = OutputParser(tools=fmt)
        _, _, calls = collect(parser.feed(text) + parser.finish())
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


def test_grammar_applies_after_thinking_ends(compiler, tokenizer):
    grammar = compiler.compile(ConstraintSpec(answer=Answer("json", schema=WEATHER), think_end="</think>"))
    thought = tokenizer.encode("I should answer in JSON.</think>\n", add_special_tokens=False)
    constraint = make_constraint(grammar, tokenizer, VOCAB)
    free = constraint.allowed_tokens()
    assert free is None or free.sum() > VOCAB // 2  # thinking is (nearly) unconstrained
    for token in thought:
        constraint.consume(token)
    mask = constraint.allowed_tokens()
    assert mask is not None and mask.sum() < 50  # now only whitespace or '{' may come
    for seed in range(5):
        _, text = sample(grammar, tokenizer, seed, forced=thought)
        answer = text.split("</think>", 1)[1]
        jsonschema.validate(json.loads(answer), WEATHER)


def test_masks_are_identical_for_identical_tokens(compiler, tokenizer):
    """What keeps ranks in lock-step: same grammar + same tokens = same mask, built independently."""
    grammar = compiler.compile(ConstraintSpec(answer=Answer("json", schema=ORDER)))
    tokens, _ = sample(grammar, tokenizer, 3)
    a, b = make_constraint(grammar, tokenizer, VOCAB), make_constraint(grammar, tokenizer, VOCAB)
    for token in tokens:
        ma, mb = a.allowed_tokens(), b.allowed_tokens()
        assert (ma is None and mb is None) or np.array_equal(ma, mb)
        a.consume(token)
        b.consume(token)


def test_a_dead_end_allows_only_end_of_sequence(compiler, tokenizer):
    grammar = compiler.compile(ConstraintSpec(answer=Answer("choice", choices=("yes",))))
    constraint = make_constraint(grammar, tokenizer, VOCAB)
    constraint.consume(tokenizer.encode("no", add_special_tokens=False)[0])  # a token the mask forbade
    assert constraint.finished
    mask = constraint.allowed_tokens()
    assert set(np.flatnonzero(mask)) == set(tokenizer.eos_token_ids)


def test_the_decode_step_masks_constrained_rows_and_leaves_free_rows_alone(models_dir):
    """Executor-level: a constrained and a free sequence in one batch (the engine's decode step)."""
    from mlx_cluster import constrain
    from mlx_cluster.cache.testing import load_tiny, make_executor
    from mlx_cluster.engine.plan import StepPlan

    loaded = load_tiny(models_dir)
    constrain.install(loaded.tokenizer, VOCAB)
    assert constrain.sequence_constraint("") is None
    grammar = GrammarCompiler(loaded.tokenizer, VOCAB).compile(ConstraintSpec(answer=Answer("json", schema=WEATHER)))
    eos = tuple(sorted(loaded.tokenizer.eos_token_ids))

    def run(seqs):
        executor = make_executor(loaded, None)
        executor.apply(StepPlan(step=0, new=tuple(seqs)))
        tokens = {s.seq_id: [] for s in seqs}
        while executor.active:
            for out in executor.step():
                tokens[out.seq_id].append(out.token)
        return tokens

    free = NewSequence(1, (5, 6, 7, 8), SamplingParams(max_tokens=12, seed=3, temperature=0.9))
    sampled = SamplingParams(max_tokens=120, seed=4, temperature=1.0, stop_token_ids=eos)
    greedy = SamplingParams(max_tokens=120, seed=0, temperature=0.0, stop_token_ids=eos)
    together = run(
        [free, NewSequence(2, (5, 6, 7), sampled, grammar=grammar), NewSequence(3, (9,), greedy, grammar=grammar)]
    )
    assert together[1] == run([free])[1]  # a free row samples as if it were alone
    for seq_id in (2, 3):
        tokens = together[seq_id]
        assert tokens[-1] in eos
        jsonschema.validate(json.loads(loaded.tokenizer.decode(tokens[:-1])), WEATHER)


# ---- output parsing ------------------------------------------------------------------------------


def feed_in_pieces(parser: OutputParser, text: str, size: int) -> list:
    parts = []
    for i in range(0, len(text), size):
        parts += parser.feed(text[i : i + size])
    return parts + parser.finish()


HERMES_OUT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "a \\"}\\" b"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_hermes_tool_calls_stream_id_and_name_first_then_arguments(tokenizer, size):
    parser = OutputParser(tools=resolve_tool_format("auto", tokenizer))
    parts = feed_in_pieces(parser, HERMES_OUT, size)
    assert parser.made_tool_call
    _, content, calls = collect(parts)
    assert content == "Let me check.\n"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "note": 'a "}" b'}
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "CET"}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    first = [p for p in parts if isinstance(p, ToolCall) and p.index == 0]
    assert first[0].id and first[0].name == "get_weather" and first[0].arguments == ""
    assert all(p.id is None for p in first[1:])
    if size < 10:
        assert len(first) > 2  # arguments came in several pieces
    assert not any("<tool_call>" in p.text or "</tool" in p.text for p in parts if isinstance(p, Content))


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_reasoning_is_split_from_the_answer(size):
    think = resolve_reasoning_format("think", None)
    parser = OutputParser(reasoning=think, in_reasoning=True)
    parts = feed_in_pieces(parser, "step one, step two</think>\n\nThe answer.", size)
    reasoning, content, calls = collect(parts)
    assert (reasoning, content, calls) == ("step one, step two", "The answer.", [])
    # A model that opens the block itself (DeepSeek-R1 / Qwen3 style).
    parser = OutputParser(reasoning=think)
    reasoning, content, _ = collect(feed_in_pieces(parser, "\n<think>hm</think>ok <think> stays", size))
    assert (reasoning, content) == ("hm", "ok <think> stays")
    # Without a reasoning parser the markers are just text.
    assert collect(feed_in_pieces(OutputParser(), "a</think>b", size))[1] == "a</think>b"


def test_tool_call_after_reasoning_and_truncated_calls(tokenizer):
    fmt = resolve_tool_format("auto", tokenizer)
    think = resolve_reasoning_format("think", None)
    parser = OutputParser(tools=fmt, reasoning=think, in_reasoning=True)
    text = 'hmm</think><tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": 2}]}}\n</tool_call>'
    reasoning, content, calls = collect(feed_in_pieces(parser, text, 3))
    assert (
        reasoning == "hmm" and content == "" and json.loads(calls[0]["function"]["arguments"]) == {"a": [1, {"b": 2}]}
    )
    # Cut off by max_tokens: what was streamed stays (finish_reason says length).
    parser = OutputParser(tools=fmt)
    _, _, calls = collect(feed_in_pieces(parser, '<tool_call>\n{"name": "f", "arguments": {"a": "xy', 2))
    assert calls[0]["function"]["name"] == "f" and calls[0]["function"]["arguments"] == '{"a": "xy'
    # Not a call we can read: kept as text rather than lost.
    parser = OutputParser(tools=fmt)
    _, content, calls = collect(feed_in_pieces(parser, "<tool_call>\nnot json\n</tool_call> tail", 5))
    assert calls == [] and content == "<tool_call>\nnot json\n</tool_call>tail"


def test_mistral_calls_are_parsed_when_the_output_ends():
    parser = OutputParser(tools=load_tool_format("mistral"))
    text = 'Sure.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    _, content, calls = collect(feed_in_pieces(parser, text, 4))
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {}]


def test_format_resolution(tokenizer):
    assert resolve_tool_format("auto", tokenizer).name == "json_tools"
    assert resolve_tool_format("hermes", tokenizer).syntax == HERMES
    assert resolve_tool_format("none", tokenizer) is None
    assert resolve_tool_format("qwen3_coder", tokenizer).syntax is None  # parsed, not enforceable
    assert resolve_reasoning_format("auto", tokenizer).end == "</think>"  # the built-in template can think
    assert resolve_reasoning_format("none", tokenizer) is None
    with pytest.raises(ValueError, match="unknown tool parser"):
        resolve_tool_format("nope", tokenizer)
    assert isinstance(Reasoning("x"), Reasoning)


def test_auto_tools_with_a_response_format_allow_either(compiler, tokenizer):
    spec = ConstraintSpec(
        answer=Answer("json", schema=ORDER), tools=(Tool("get_weather", WEATHER),), tool_mode="auto", syntax=HERMES
    )
    grammar = compiler.compile(spec)
    kinds = set()
    for seed in range(12):
        _, text = sample(grammar, tokenizer, seed, max_tokens=3000)
        if text.startswith("<tool_call>"):
            kinds.add("call")
            for call in tool_calls(text, tokenizer):
                jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
        else:
            kinds.add("answer")
            jsonschema.validate(json.loads(text), ORDER)
    assert kinds == {"call", "answer"}
    # auto with strict tools and no answer format: free text, or calls that validate.
    grammar = compiler.compile(ConstraintSpec(tools=(Tool("get_weather", WEATHER),), tool_mode="auto", syntax=HERMES))
    forced = [tokenizer.convert_tokens_to_ids("<tool_call>")]
    _, text = sample(grammar, tokenizer, 0, forced=forced, max_tokens=3000)
    for call in tool_calls(text, tokenizer):
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


def test_messages_and_responses_translate_onto_one_chat_request():
    from mlx_cluster.server.messages import MessagesRequest
    from mlx_cluster.server.messages import to_chat as messages_to_chat
    from mlx_cluster.server.protocol import parse_request
    from mlx_cluster.server.responses import ResponsesRequest, input_messages
    from mlx_cluster.server.responses import to_chat as responses_to_chat

    body = {
        "model": "m",
        "max_tokens": 9,
        "system": [{"type": "text", "text": "sys"}],
        "stop_sequences": ["END"],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 100},
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "ok"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "42"},
                    {"type": "text", "text": "go"},
                ],
            },
        ],
    }
    chat = messages_to_chat(parse_request(MessagesRequest, body))
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert chat.messages[2].tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert chat.messages[3].tool_call_id == "t1" and chat.messages[3].content == "42"
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False and chat.stop == ["END"]
    assert chat.chat_template_kwargs == {"enable_thinking": True} and chat.max_tokens == 9

    req = parse_request(
        ResponsesRequest,
        {
            "instructions": "be nice",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "1"},
                {"type": "reasoning", "summary": []},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
            "max_output_tokens": 7,
        },
    )
    new = input_messages(req)
    chat = responses_to_chat(req, [{"role": "user", "content": "earlier"}], new)
    assert [m.role for m in chat.messages] == ["system", "user", "user", "assistant", "tool"]
    assert [c["id"] for c in chat.messages[3].tool_calls] == ["c1", "c2"]
    assert chat.tools[0].function.strict is True  # Responses function tools are strict unless told otherwise
    assert chat.tool_choice.function.name == "f" and chat.max_tokens == 7
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
