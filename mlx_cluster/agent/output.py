"""Split a choice's streamed text into reasoning, answer text and tool calls.

One `OutputParser` per choice, fed the text deltas the engine sends. It emits parts that every
API surface (chat, Responses, Messages) renders in its own shape:

    Reasoning(text)   inside <think>...</think>
    Content(text)     the answer
    ToolCall(index, id, name, arguments)   the first part of a call carries id and name;
                                           later parts carry more of `arguments` (a JSON string)

Text that might be the beginning of a marker is held back until it is known not to be, so a
marker split across tokens never leaks into the answer.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass

from mlx_cluster.agent.formats import ReasoningFormat, ToolFormat

log = logging.getLogger(__name__)

# {"name": "...", "arguments": <value>: matched once the value's first character has arrived.
_JSON_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)', re.DOTALL)


@dataclass
class Reasoning:
    text: str


@dataclass
class Content:
    text: str


@dataclass
class ToolCall:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class _JsonValueEnd:
    """Finds where one JSON value ends in text that arrives in pieces (depth and string tracking)."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False

    def feed(self, text: str) -> int | None:
        """Index in `text` just past the end of the value, or None if it has not ended yet."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
                continue
            if ch.isspace() and not self.started:
                continue
            self.started = True
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif self.depth == 0 and ch in ",}\n":
                return i  # a bare scalar (number, true, null) ended
        return None


class OutputParser:
    """Incremental splitter for one choice. `feed()` text as it arrives, then `finish()`."""

    def __init__(
        self,
        *,
        tools: ToolFormat | None = None,
        reasoning: ReasoningFormat | None = None,
        in_reasoning: bool = False,
        tool_specs: list | None = None,
    ):
        self.tools = tools
        self.reasoning = reasoning if reasoning is not None else None
        self.tool_specs = tool_specs or []
        self.state = "reasoning" if (reasoning is not None and in_reasoning) else "content"
        self.buffer = ""
        self.seen_content = False  # a <think> only opens reasoning at the very start of the answer
        self.strip_leading = False
        self.calls = 0
        self.call_text = ""
        self._streamed_call: ToolCall | None = None
        self._args_end: _JsonValueEnd | None = None
        self._args_done = False

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    @property
    def made_tool_call(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> list:
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> list:
        """The output ended: flush what was held back; an unterminated call is parsed as it stands."""
        parts = self._drain(final=True)
        if self.state == "tool":
            parts += self._end_call(final=True)
        elif self.buffer:
            parts += self._emit(self.buffer)
            self.buffer = ""
        return parts

    # ---- states -----------------------------------------------------------------------
    def _drain(self, final: bool) -> list:
        parts: list = []
        while self.buffer:
            before = (self.state, len(self.buffer))
            if self.state == "reasoning":
                parts += self._scan(self.reasoning.end, "content", final)
            elif self.state == "content":
                parts += self._scan_content(final)
            else:
                parts += self._scan_tool(final)
            if (self.state, len(self.buffer)) == before:
                break
        return parts

    def _scan(self, marker: str, next_state: str, final: bool) -> list:
        """Emit text up to `marker` in the current state, then switch state."""
        i = self.buffer.find(marker)
        if i >= 0:
            parts = self._emit(self.buffer[:i])
            self.buffer = self.buffer[i + len(marker) :]
            self.state = next_state
            self.strip_leading = True
            return parts
        keep = 0 if final else _partial_suffix(self.buffer, [marker])
        parts = self._emit(self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return parts

    def _scan_content(self, final: bool) -> list:
        if self.strip_leading:
            stripped = self.buffer.lstrip()
            if not stripped and not final:
                self.buffer = ""
                return []
            self.buffer = stripped
            self.strip_leading = False
        markers = []
        if self.reasoning is not None and not self.seen_content:
            lead = self.buffer.lstrip()
            if lead.startswith(self.reasoning.start):
                self.buffer = lead[len(self.reasoning.start) :]
                self.state = "reasoning"
                return []
            if not final and self.reasoning.start.startswith(lead):
                return []  # may still become <think>
        if self.tools is not None:
            markers.append(self.tools.start)
            i = self.buffer.find(self.tools.start)
            if i >= 0:
                parts = self._emit(self.buffer[:i])
                self.buffer = self.buffer[i + len(self.tools.start) :]
                self._start_call()
                return parts
        keep = 0 if final else _partial_suffix(self.buffer, markers)
        parts = self._emit(self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return parts

    def _scan_tool(self, final: bool) -> list:
        end = self.tools.end
        i = self.buffer.find(end) if end else -1
        if i >= 0:
            text, self.buffer = self.buffer[:i], self.buffer[i + len(end) :]
        else:
            keep = 0 if final or not end else _partial_suffix(self.buffer, [end])
            text, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        parts = self._grow_call(text)
        if i >= 0:
            parts += self._end_call(final=False)
        return parts

    # ---- tool calls -------------------------------------------------------------------
    def _start_call(self) -> None:
        self.state = "tool"
        self.call_text = ""
        self._streamed_call = None
        self._args_end = None
        self._args_done = False

    def _grow_call(self, text: str) -> list:
        """Hermes-style JSON calls stream their arguments as they are generated."""
        self.call_text += text
        if not self.tools.json_arguments:
            return []
        parts = []
        if self._streamed_call is None:
            m = _JSON_CALL_HEAD.match(self.call_text)
            if m is None:
                return []
            try:
                name = json.loads(m.group(1))
            except json.JSONDecodeError:
                return []
            self._streamed_call = ToolCall(self.calls, new_call_id(), name)
            self._args_end = _JsonValueEnd()
            parts.append(ToolCall(self.calls, self._streamed_call.id, name, ""))
            text = self.call_text[m.end() :]
        if not self._args_done and text:
            end = self._args_end.feed(text)
            piece = text if end is None else text[:end]
            self._args_done = end is not None
            if piece:
                self._streamed_call.arguments += piece
                parts.append(ToolCall(self.calls, arguments=piece))
        return parts

    def _end_call(self, final: bool) -> list:
        self.state = "content"
        self.strip_leading = True
        text, streamed = self.call_text, self._streamed_call
        self.call_text, self._streamed_call = "", None
        if streamed is not None:
            self.calls += 1
            return []  # id, name and arguments already went out
        try:
            parsed = self.tools.parse(text, self.tool_specs)
        except Exception as e:  # a malformed or truncated call: keep the text rather than lose it
            log.info("could not parse a tool call (%s: %s); returning it as text", type(e).__name__, e)
            end = "" if final else self.tools.end
            return self._emit(self.tools.start + text + end)
        parts = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            parts.append(ToolCall(self.calls, call.get("id") or new_call_id(), call["name"], arguments))
            self.calls += 1
        return parts

    def _emit(self, text: str) -> list:
        if not text:
            return []
        if self.state == "reasoning":
            return [Reasoning(text)]
        self.seen_content = self.seen_content or bool(text.strip())
        return [Content(text)]


def _partial_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a marker (to hold back)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


def collect(parts: list) -> tuple[str, str, list[dict]]:
    """Gather parts into (reasoning, content, tool_calls as OpenAI dicts) for a whole response."""
    reasoning, content, calls = [], [], {}
    for p in parts:
        if isinstance(p, Reasoning):
            reasoning.append(p.text)
        elif isinstance(p, Content):
            content.append(p.text)
        else:
            call = calls.setdefault(p.index, {"id": p.id, "name": p.name, "arguments": ""})
            call["arguments"] += p.arguments
    tool_calls = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for _, c in sorted(calls.items())
    ]
    return "".join(reasoning), "".join(content), tool_calls
