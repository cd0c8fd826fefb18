"""Structural validation of normalized conversations; failures become quarantine reasons."""

from __future__ import annotations

import unicodedata
from typing import Any

from eyas.data.normalize import RecordError
from eyas.data.tools import order_error, turn_kind

# Unicode categories that print nothing: format characters (U+200B zero-width space, U+200D,
# U+2060, U+FEFF), separators and controls. A text made only of them is empty.
_INVISIBLE = {"Cf", "Zs", "Zl", "Zp", "Cc"}


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace, zero-width or other format characters."""
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


def _check_contents(messages: list[dict[str, Any]], regenerate: bool) -> None:
    for i, msg in enumerate(messages):
        content = msg["content"]
        if content is None and msg["role"] == "assistant":
            if not regenerate:
                raise RecordError("missing_reply", f"messages[{i}] (assistant) has no reply and generation.mode=keep")
            continue
        if not isinstance(content, str):
            raise RecordError("non_string_content", f"messages[{i}].content is a {type(content).__name__}")
        # A tool call's text is its calls: its content may be empty.
        if is_blank(content) and not (msg["role"] == "assistant" and (regenerate or msg.get("tool_calls"))):
            raise RecordError("empty_content", f"messages[{i}] ({msg['role']}) is empty")


def _check_order(messages: list[dict[str, Any]]) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] == "user" for m in body):
        raise RecordError("no_user_turn", "the conversation has no user turn")
    found = order_error(messages)
    if found is not None:
        i, allowed = found
        raise RecordError("not_alternating", f"messages[{i}] is {turn_kind(messages[i])}, expected "
                                             f"{' or '.join(allowed)} "
                                             "(user and assistant alternate; a tool call is followed by "
                                             "its results, then the assistant)")


def check_size(messages: list[dict[str, Any]], max_turns: int | None, max_chars: int | None) -> None:
    """Quarantine huge records before any per-turn work (template rendering is per turn)."""
    if max_turns is not None and len(messages) > max_turns:
        raise RecordError("too_many_turns", f"{len(messages)} messages > data.max_turns={max_turns}")
    if max_chars is not None:
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        if chars > max_chars:
            raise RecordError("too_long", f"{chars} characters > data.max_chars={max_chars} "
                                          "(checked before tokenizing)")


def validate_messages(messages: list[dict[str, Any]], regenerate: bool, max_turns: int | None = None,
                      max_chars: int | None = None) -> list[dict[str, Any]]:
    """Return the conversation ready for the next steps, or raise ``RecordError``.

    Linear in the record's size: the size caps come first, then one pass over the messages.

    In regenerate mode every assistant text reply is replaced by the target's, so a conversation
    that ends on a user turn (or a tool result) gets an empty reply slot (``content=None``)
    appended; in keep mode such a conversation has nothing to learn from its last turn and is
    quarantined (``missing_reply``). Tool calls and tool results are kept as they are: the
    target cannot run the tools, so a call of its own would have no result to continue from.
    """
    check_size(messages, max_turns, max_chars)
    _check_order(messages)
    if messages[-1]["role"] in ("user", "tool"):
        if not regenerate:
            raise RecordError("missing_reply", f"the conversation ends on a {messages[-1]['role']} turn "
                                               "and generation.mode=keep")
        messages = [*messages, {"role": "assistant", "content": None}]
    _check_contents(messages, regenerate)
    if regenerate:
        messages = [{**m, "content": None} if m["role"] == "assistant" and not m.get("tool_calls") else m
                    for m in messages]
    return messages
