"""Which tool-call and reasoning formats a model speaks, chosen by `model.tool_parser` and
`model.reasoning_parser` (auto | none | NAME).

Tool-call parsers are mlx-lm's own (`mlx_lm.tool_parsers`): the module gives the start and end
markers and `parse_tool_call(text, tools)`. For the formats whose calls are JSON we also know
how to write a grammar (`constrain.ToolSyntax`), which is what makes `tool_choice` required /
named and `strict` tools enforceable.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from mlx_cluster.constrain.grammar import ToolSyntax

# Friendlier names for mlx-lm's parser modules.
TOOL_PARSER_ALIASES = {"hermes": "json_tools", "qwen3": "json_tools", "qwen2_5": "json_tools"}
# Parser modules whose calls we can also enforce with a grammar.
_SYNTAX_STYLE = {"json_tools": "hermes", "mistral": "mistral"}

REASONING_PARSERS = {
    "think": ("<think>", "</think>"),
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
}


@dataclass(frozen=True)
class ToolFormat:
    """One model family's tool-call syntax."""

    name: str
    start: str
    end: str  # "" when calls run to the end of the output (Mistral)
    parse: Callable  # mlx-lm: parse_tool_call(text, tools) -> dict | list[dict]
    syntax: ToolSyntax | None  # None: we parse this format but cannot constrain it

    @property
    def json_arguments(self) -> bool:
        """Calls look like {"name": ..., "arguments": {...}}: arguments can be streamed as they come."""
        return self.name == "json_tools"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str
    end: str


def tool_parser_names() -> list[str]:
    """Every name `model.tool_parser` accepts besides auto and none."""
    import mlx_lm.tool_parsers as pkg

    modules = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted({*modules, *TOOL_PARSER_ALIASES})


def load_tool_format(name: str) -> ToolFormat:
    """The named parser (an mlx-lm tool_parsers module, or an alias of one)."""
    module_name = TOOL_PARSER_ALIASES.get(name, name)
    if module_name not in tool_parser_names():
        raise ValueError(f"unknown tool parser {name!r}; choose one of: auto, none, {', '.join(tool_parser_names())}")
    module = importlib.import_module(f"mlx_lm.tool_parsers.{module_name}")
    style = _SYNTAX_STYLE.get(module_name)
    start, end = module.tool_call_start, module.tool_call_end
    syntax = ToolSyntax(style, start, end) if style else None
    return ToolFormat(module_name, start, end, module.parse_tool_call, syntax)


def resolve_tool_format(setting: str, tokenizer) -> ToolFormat | None:
    """`model.tool_parser` for this tokenizer: auto takes what mlx-lm inferred from the chat template."""
    if setting == "none":
        return None
    if setting != "auto":
        return load_tool_format(setting)
    init = getattr(tokenizer, "init_kwargs", None) or {}
    inferred = init.get("tool_parser_type")
    if inferred is None:
        try:
            from mlx_lm.tokenizer_utils import _infer_tool_parser

            inferred = _infer_tool_parser(tokenizer)
        except Exception:  # an odd tokenizer: no tool calling rather than no server
            inferred = None
    return load_tool_format(inferred) if inferred else None


def resolve_reasoning_format(setting: str, tokenizer) -> ReasoningFormat | None:
    """`model.reasoning_parser`: auto uses the think markers in the vocabulary or the chat template."""
    if setting == "none":
        return None
    if setting != "auto":
        if setting not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {setting!r}; choose one of: auto, none, {', '.join(REASONING_PARSERS)}"
            )
        return ReasoningFormat(setting, *REASONING_PARSERS[setting])
    if getattr(tokenizer, "has_thinking", False) and tokenizer.think_start and tokenizer.think_end:
        return ReasoningFormat("auto", tokenizer.think_start, tokenizer.think_end)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<think>" in template:
        return ReasoningFormat("auto", "<think>", "</think>")
    return None


def marker_token_ids(tokenizer, formats) -> set[int]:
    """Token ids of markers that are single tokens: they must stay visible in the text even when
    the tokenizer calls them special, or the parsers would never see them."""
    ids = set()
    for fmt in formats:
        if fmt is None:
            continue
        for marker in (fmt.start, fmt.end):
            if marker:
                encoded = list(tokenizer.encode(marker, add_special_tokens=False))
                if len(encoded) == 1:
                    ids.add(encoded[0])
    return ids
