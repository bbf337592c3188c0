"""Compile what a request asks for (a JSON schema, a regex, a choice, tool calls) into one
llguidance grammar string, on rank 0, before the request is admitted.

The grammar is written in llguidance's Lark dialect so the pieces compose:

    start: think? body          think: the reasoning block, unconstrained (when the prompt opened one)
    body:  answer | calls       answer: %json / regex / choice, or free text;  calls: tool calls

Tool calls follow the model's own syntax (`ToolSyntax`): Hermes/Qwen `<tool_call>\\n{json}\\n</tool_call>`
or Mistral `[TOOL_CALLS][{json}, ...]`, with each function's arguments checked against its
parameters schema. Markers that are single tokens of the vocabulary are written as token ids
(`<[id]>`), so the model emits the token it was trained on.

Every grammar is validated against the model's tokenizer here; anything llguidance cannot
enforce (an unsupported JSON Schema keyword, a look-around in a regex) is a `GrammarError`
naming the request field, which the server answers with a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

# JSON in the compact form a model writes most reliably; flexible whitespace lets a weak model
# pad forever between tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}
_WS = r"/[ \t\r\n]{1,4}/"


class GrammarError(ValueError):
    """A request's constraint cannot be enforced; `param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ToolSyntax:
    """How a model family writes tool calls (see agent/tools.py for the parsers)."""

    style: Literal["hermes", "mistral"]
    start: str  # e.g. "<tool_call>"
    end: str = ""  # e.g. "</tool_call>"; "" when calls run to the end of the output


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict = field(default_factory=lambda: {"type": "object"})
    param: str = "tools"  # the request field naming this tool, for errors


@dataclass(frozen=True)
class Answer:
    """A constraint on the (non-tool) answer."""

    kind: Literal["json", "regex", "choice"]
    schema: dict | None = None
    pattern: str = ""
    choices: tuple[str, ...] = ()
    param: str = "response_format"


@dataclass(frozen=True)
class ConstraintSpec:
    answer: Answer | None = None
    tools: tuple[Tool, ...] = ()
    tool_mode: Literal["none", "auto", "required"] = "none"  # "required" with one tool = a named choice
    parallel: bool = True
    syntax: ToolSyntax | None = None
    think_end: str = ""  # the prompt left the model inside a reasoning block that ends with this

    @property
    def empty(self) -> bool:
        return self.answer is None and self.tool_mode != "required" and not (self.tool_mode == "auto" and self.tools)


class GrammarCompiler:
    """Builds and validates grammars for one tokenizer (rank 0 keeps one)."""

    def __init__(self, tokenizer, vocab_size: int):
        from mlx_cluster.constrain.matcher import ll_tokenizer

        self.tokenizer = tokenizer
        self.ll = ll_tokenizer(tokenizer, vocab_size)

    def compile(self, spec: ConstraintSpec) -> str:
        """The grammar for `spec`, or "" when nothing needs enforcing."""
        if spec.empty:
            return ""
        rules: list[str] = []
        body = self._body(spec, rules)
        if body is None:
            return ""
        start = body
        if spec.think_end:
            start = f"think ws? {body}"
            rules.append(self._think_rule(spec.think_end))
            rules.append(f"ws: {_WS}")
        grammar_text = "\n".join([f"start: {start}", *rules])
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(grammar_text)
        self._validate(grammar, spec.answer.param if spec.answer else "tools")
        return grammar

    # ---- pieces ---------------------------------------------------------------------
    def _body(self, spec: ConstraintSpec, rules: list[str]) -> str | None:
        answer = self._answer(spec.answer, rules) if spec.answer is not None else None
        if spec.tool_mode == "none" or not spec.tools:
            return answer
        if spec.syntax is None:
            raise GrammarError("tool_choice", "this model's tool-call format cannot be enforced with a grammar")
        calls = self._calls(spec, rules)
        if spec.tool_mode == "required":
            return calls
        if answer is None:
            # auto: free text or calls. Free text must not contain the call marker, which only a
            # marker that is one token can express cheaply.
            start = self._marker(spec.syntax.start)
            if not start.startswith("<["):
                return None
            rules.append(f"free: <[^{start[2:-2]}]>*")
            answer = "free"
        rules.append(f"answer_or_calls: {answer} | {calls}")
        return "answer_or_calls"

    def _answer(self, answer: Answer, rules: list[str]) -> str:
        if answer.kind == "json":
            self._check_schema(answer.schema, f"{answer.param}")
            rules.append(f"answer: %json {_json_with_options(answer.schema)}")
        elif answer.kind == "regex":
            rules.append(f"answer: /{_lark_regex(answer.pattern)}/")
        else:
            if not answer.choices:
                raise GrammarError(answer.param, "give at least one choice")
            rules.append("answer: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in answer.choices))
        return "answer"

    def _calls(self, spec: ConstraintSpec, rules: list[str]) -> str:
        syntax = spec.syntax
        names = []
        for i, tool in enumerate(spec.tools):
            self._check_schema(tool.parameters, tool.param)
            prefix = json.dumps(
                f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": ', ensure_ascii=False
            )
            rules.append(f'fn_{i}: {prefix} args_{i} "}}"')
            rules.append(f"args_{i}: %json {_json_with_options(tool.parameters)}")
            names.append(f"fn_{i}")
        rules.append("fn: " + " | ".join(names))
        start = self._marker(syntax.start)
        if syntax.style == "hermes":
            end = self._marker(syntax.end)
            rules.append(f'call: {start} "\\n" fn "\\n" {end}')
            rules.append('calls: call ("\\n" call)*' if spec.parallel else "calls: call")
        else:  # mistral: [TOOL_CALLS][{...}, {...}]
            more = '(", " fn)*' if spec.parallel else ""
            rules.append(f'calls: {start} "[" fn {more} "]"')
        return "calls"

    def _think_rule(self, end: str) -> str:
        """Anything up to and including the end marker (lazily: the first one ends the block)."""
        marker = self._marker(end)
        if marker.startswith("<["):
            return f"think: <[^{marker[2:-2]}]>* {marker}"
        return f"think[lazy]: /(?s:.*){_regex_escape(end)}/"

    def _marker(self, text: str) -> str:
        """A marker as one token id when the vocabulary has it as one (special) token, else as text."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if len(ids) == 1 and self.ll.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text, ensure_ascii=False)

    def _check_schema(self, schema, param: str) -> None:
        import llguidance

        if not isinstance(schema, dict):
            raise GrammarError(param, "a JSON schema must be an object")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(param, f"not a valid JSON schema: {e}") from None
        self._validate(grammar, param)

    def _validate(self, grammar: str, param: str) -> None:
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if is_error:
            raise GrammarError(param, "cannot be enforced by this server: " + _clean(messages[0]))


def _json_with_options(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append("\\" + ch if ch in r"\.+*?()|[]{}^$#&-~/" else ch)
    return "".join(out)


def _lark_regex(pattern: str) -> str:
    """A user regex inside Lark's /.../: escape the slashes that are not escaped yet."""
    out, escaped = [], False
    for ch in pattern:
        if ch == "/" and not escaped:
            out.append("\\/")
        else:
            out.append(ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


def _clean(message: str) -> str:
    return " ".join(message.split())[:500]
