"""Tool use in conversations: turn order, and the texts the PII policy must see.

Tool calls are normalized (``eyas.data.normalize``) to OpenAI-style messages: an assistant turn
``{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name":
str, "arguments": dict}}]}`` and a result ``{"role": "tool", "content": str}``; the declared
tools travel beside the messages (``tools_json``). A turn is one of ``user``, ``assistant`` (a
text reply), ``tool_call`` (an assistant turn that calls tools) or ``tool`` (a result);
``FOLLOWS`` says which may come next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from eyas.data.normalize import RecordError, parse_tool_calls

# Which turn kinds may follow each kind (None: the first turn after an optional system prompt).
FOLLOWS: dict[str | None, tuple[str, ...]] = {
    None: ("user",), "user": ("assistant", "tool_call"), "assistant": ("user",),
    "tool_call": ("tool",), "tool": ("tool", "assistant", "tool_call")}


def turn_kind(message: dict[str, Any]) -> str:
    """``tool_call`` for an assistant turn that calls tools, else the message's role."""
    if message.get("role") == "assistant" and message.get("tool_calls"):
        return "tool_call"
    return message.get("role", "")


def order_error(messages: Sequence[dict[str, Any]]) -> tuple[int, tuple[str, ...]] | None:
    """``(index, allowed kinds)`` of the first message out of order, or None when the order is
    valid: an optional system prompt, then a user turn, then turns as ``FOLLOWS`` allows."""
    start = 1 if messages and messages[0].get("role") == "system" else 0
    previous = None
    for i in range(start, len(messages)):
        kind = turn_kind(messages[i])
        if kind not in FOLLOWS[previous]:
            return i, FOLLOWS[previous]
        previous = kind
    return None


def uses_tools(messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    """Whether a conversation declares tools, calls one or carries a tool result."""
    return bool(tools) or any(turn_kind(m) in ("tool_call", "tool") for m in messages)


def text_reply_positions(messages: list[dict[str, Any]]) -> list[int]:
    """Positions among the assistant turns (0 = the first) of the text replies, the turns that
    regeneration writes (tool calls are kept), in order."""
    assistant = [m for m in messages if m.get("role") == "assistant"]
    return [k for k, m in enumerate(assistant) if not m.get("tool_calls")]


# ----------------------------------------------------------------------------- PII


def pii_texts(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The texts of a conversation the PII policy must see, as ``{"role", "content"}``: each
    written content, and after a tool call's content the JSON of its calls (arguments can hold
    personal data). Replies still to be generated (``content=None``) have none."""
    out = []
    for m in messages:
        if m["content"] is not None:
            out.append({"role": m["role"], "content": m["content"]})
        if m.get("tool_calls"):
            out.append({"role": m["role"], "content": json.dumps(m["tool_calls"], ensure_ascii=False)})
    return out


def merge_pii_texts(messages: list[dict[str, Any]],
                    scrubbed: list[dict[str, str]]) -> list[dict[str, Any]] | None:
    """``messages`` with the scrubbed texts of ``pii_texts`` put back; None when a redaction
    broke the JSON of a tool call (the conversation cannot be kept without leaking)."""
    texts = iter(scrubbed)
    out = []
    for m in messages:
        m = {**m, "content": next(texts)["content"]} if m["content"] is not None else dict(m)
        if m.get("tool_calls"):
            try:
                m["tool_calls"] = parse_tool_calls(json.loads(next(texts)["content"]))
            except (json.JSONDecodeError, RecordError):
                return None
        out.append(m)
    return out
