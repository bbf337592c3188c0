"""Small helpers for reading OpenAI-style server-sent event streams.

Kept free of I/O so that they can be unit-tested on plain strings.
"""

from __future__ import annotations

DONE = "[DONE]"


def sse_data(line: str) -> str | None:
    """Return the payload of a `data:` line, or None for any other line.

    Blank lines (event separators), comments (`: keep-alive`) and `event:`/`id:`/`retry:`
    fields carry nothing the benchmark needs. Per the SSE spec one optional space follows
    the colon, so both `data: {...}` and `data:{...}` are accepted.
    """
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[5:]
    return data[1:] if data.startswith(" ") else data


def chunk_text(chunk: dict, endpoint: str) -> str:
    """The generated text carried by one streamed chunk ("" when it carries none).

    Chat chunks carry text in choices[].delta.content (reasoning models may also use
    delta.reasoning_content / delta.reasoning, which are tokens too); completion chunks in
    choices[].text. The first chat chunk usually only announces the role and the final
    usage chunk has no choices: neither is a token.
    """
    parts = []
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            delta = choice.get("delta") or {}
            for key in ("content", "reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    parts.append(delta[key])
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


def chunk_error(chunk: dict) -> str | None:
    """The error message of an in-stream error chunk (`{"error": ...}`), else None."""
    err = chunk.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)
