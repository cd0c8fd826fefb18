"""Chat template + tokenize + assistant loss mask (the data stage's step 5).

A conversation is rendered ONCE with the target's own chat template and tokenized once, so every
token boundary is the one the target sees in the whole conversation; nothing is re-tokenized in
isolation. The loss mask is then derived without ``{% generation %}`` tags, per assistant turn i:

1. Serving prompt. ``messages[:i]`` rendered with ``add_generation_prompt=True`` is exactly what
   the target is given to write reply i. Its text must be a prefix of the whole rendering and its
   token ids a prefix of the whole ids; otherwise the template renders history differently once
   later turns follow (or the reply merges with the prompt into one token) and we raise
   ``ChatTemplateError`` naming the template and the turn instead of guessing.
2. Reply text. The conversation is rendered again with reply i replaced by two one-character
   probes; the characters where the renderings differ are where the template wrote reply i
   (after any trimming or reasoning stripping the template does).
3. Mask. 1 on the tokens that carry the reply text, on the template's end-of-turn control token
   right after it (``<|eot_id|>``, ``<|eot|>``, ``<|im_end|>``, ``</s>``), and on whitespace the
   template puts between the serving prompt and the reply or between the reply and that token
   (stories260k's ``' '``): the target writes those itself. 0 on everything else: BOS, system
   text, role headers, generation prompts, text after the end-of-turn token (Qwen's ``"\\n"``).

Qwen3 thinking: the mask follows the serving mode, ``enable_thinking`` (``data.template.
enable_thinking``, passed to every rendering and to regeneration; None = the template's default,
thinking on for Qwen3). Thinking on: the serving prompt ends at ``<|im_start|>assistant\n`` and
the target writes ``<think>\n...</think>\n\n`` itself, so everything the template puts between
that prompt and the reply (the empty block before the last reply, or ``<think>\nR\n</think>\n\n``
when the reply carries its reasoning R) is masked 1 with the answer and ``<|im_end|>``. Thinking
off: the generation prompt already holds ``<think>\n\n</think>\n\n``, so that block is prompt,
masked 0, and only the answer and ``<|im_end|>`` are trained. In earlier turns the template drops
R, as it does at serving time, so only their answer is trained.

Tool use (``eyas.data.tools``). An assistant turn that calls tools (``tool_calls``) is a reply
like any other: the template writes the call (Llama's ``{"name": ..., "parameters": ...}``,
Qwen's ``<tool_call>...</tool_call>``) where the target writes it when served, so the call's
text and its end-of-turn token are masked 1 (step 2 finds it by probing the turn with a text
reply). Tool results (``tool`` messages) are input, masked 0 like user turns; the reply after
them is served with the results in its prompt. The declared tools (``tools``) are passed to
every rendering. A template that does not render declared tools, tool calls and tool results
(probed once per template) cannot hold such a conversation: ``TemplateWithoutToolsError``,
quarantine reason ``template_without_tools``.

Dates: every rendering passes ``date_string=PINNED_DATE_STRING`` (Llama 3.1's own default), so
templates that would print today's date (Llama 3.2+/4 via ``strftime_now``) render the same
bytes on every run and in every prefix of one conversation. The date lines sit in the system
header, inside the serving prompt, so they are always masked 0.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from eyas.data.tools import order_error, turn_kind, uses_tools
from eyas.data.validate import is_blank

# Llama 3.1's template default; pinned so renders are reproducible and prefix-consistent.
PINNED_DATE_STRING = "26 Jul 2024"
# Two distinct one-character replies: where a rendering with them differs from the real one is
# where the real reply sits (two probes, so a reply sharing a first/last char with one is exact).
_PROBES = ("\ue000", "\ue001")
_CHUNK = 512  # characters compared at a time when diffing renderings
# Turn kinds a conversation may end with: a reply to mask, or a history the target continues.
_ENDS = {"assistant": ("assistant", "tool_call"), "user": ("user", "tool")}
# Names no template writes by itself: a rendering holding them shows tools, calls and results.
_TOOL_PROBES = ("eyas_probe_declared", "eyas_probe_called", "\ue002")


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered or aligned with a chat template; the row is quarantined
    with the reason ``code``."""

    code = "template_error"


class TemplateWithoutToolsError(ChatTemplateError):
    """The conversation uses tools and the chat template cannot render them."""

    code = "template_without_tools"


@dataclass(frozen=True)
class TokenizedConversation:
    """One conversation as the target tokenizes it.

    input_ids: token ids of the whole rendered conversation, (T,) ints.
    loss_mask: (T,) 0/1 ints; 1 on assistant reply tokens and their end-of-turn token.
    """

    input_ids: list[int]
    loss_mask: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask has "
                             f"{len(self.loss_mask)}: they must have the same length")

    @property
    def num_tokens(self) -> int:
        """Tokens in the conversation."""
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens the draft is trained to predict (loss_mask == 1)."""
        return sum(self.loss_mask)


class _Boundary(NamedTuple):
    """Where a serving prompt ends in the whole rendering, in characters and in tokens."""

    char: int
    token: int


def load_tokenizer(path: str) -> Any:
    """The tokenizer (with chat template) saved in the local directory ``path``.

    Raises FileNotFoundError / OSError naming ``path`` when nothing loadable is there, and
    ChatTemplateError when the tokenizer has no chat template or is not a fast tokenizer.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path!r} is not a local directory: point it at a "
                                f"saved Hugging Face tokenizer or model directory")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise OSError(f"could not load a tokenizer from {path!r}: {exc}. The directory needs "
                      f"tokenizer.json and tokenizer_config.json") from exc
    _check_tokenizer(tokenizer, path)
    return tokenizer


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, Any]],
                          template_name: str = "", unfinished: Collection[int] = (),
                          enable_thinking: bool | None = None,
                          tools: list[dict[str, Any]] | None = None) -> TokenizedConversation:
    """Render ``messages`` with the tokenizer's chat template, tokenize once, mask the replies.

    messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``, an
    optional system message, then user/assistant alternating, ending with an assistant turn; an
    assistant turn may call tools (``tool_calls``, see ``eyas.data.tools``), followed by its
    ``tool`` results. ``tools``: the declared tools, given to the template. ``template_name``
    (e.g. the tokenizer path) names the template in errors. ``unfinished``: indices among the
    assistant turns (0 = the first) of replies cut by a token limit; their end-of-turn token
    (and the whitespace before it) is masked 0, since the target never ended them.
    ``enable_thinking``: the serving mode, passed to the template (None: the template's default;
    Qwen3 thinks). See the module docstring for the exact mask. Raises ChatTemplateError when the
    conversation cannot be rendered or aligned (TemplateWithoutToolsError: it uses tools and the
    template has no tool support).
    """
    name = _template_name(tokenizer, template_name)
    _check_messages(tokenizer, messages, name, last_role="assistant", tools=tools)
    full_text = _render(tokenizer, messages, name, add_generation_prompt=False, thinking=enable_thinking,
                        tools=tools)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompts = [_serving_prompt_end(tokenizer, messages, i, full_text, ids, name, enable_thinking, tools)
               for i in turns]
    control_ids = _control_token_ids(tokenizer)
    mask = [0] * len(ids)
    for k, turn in enumerate(turns):
        # The reply and its end-of-turn token must lie before the next turn's serving prompt ends.
        limit = prompts[k + 1].token if k + 1 < len(turns) else len(ids)
        span = _reply_chars(tokenizer, messages, turn, full_text, name, enable_thinking, tools)
        lo, reply_hi, hi = _reply_tokens(full_text, ids, offsets, prompts[k], span, limit, control_ids,
                                         _where(name, turn), enable_thinking)
        hi = reply_hi if k in unfinished else hi
        mask[lo:hi] = [1] * (hi - lo)
    return TokenizedConversation(input_ids=ids, loss_mask=mask)


def generation_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]],
                          template_name: str = "", enable_thinking: bool | None = None,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids the target is given to write the NEXT assistant turn after ``messages``.

    ``messages`` is a history ending with a user turn or a tool result; the result is that
    history rendered (with the declared ``tools``) and the template's generation prompt
    (template defaults, so Qwen3 thinks), tokenized exactly as ``tokenize_conversation``
    tokenizes the same prefix of a longer conversation.
    """
    name = _template_name(tokenizer, template_name)
    _check_messages(tokenizer, messages, name, last_role="user", tools=tools)
    return _encode(tokenizer, _render(tokenizer, messages, name, add_generation_prompt=True,
                                      thinking=enable_thinking, tools=tools))


def count_prompt_tokens(tokenizer: Any, messages: list[dict[str, Any]],
                        template_name: str = "", enable_thinking: bool | None = None,
                        tools: list[dict[str, Any]] | None = None) -> int:
    """Tokens of the whole rendered conversation, to quarantine ones too long for the target.

    A conversation ending with a user turn (or a tool result) is counted with its generation
    prompt, since that is what the target is given.
    """
    name = _template_name(tokenizer, template_name)
    _check_messages(tokenizer, messages, name, last_role=None, tools=tools)
    add_prompt = turn_kind(messages[-1]) in _ENDS["user"]
    return len(_encode(tokenizer, _render(tokenizer, messages, name, add_prompt, thinking=enable_thinking,
                                          tools=tools)))


# ----------------------------------------------------------------------------- checks


def _template_name(tokenizer: Any, template_name: str) -> str:
    """The name errors use: the caller's, else the tokenizer's path."""
    name = template_name or getattr(tokenizer, "name_or_path", "") or "<unnamed chat template>"
    _check_tokenizer(tokenizer, name)
    return name


def _check_tokenizer(tokenizer: Any, name: str) -> None:
    """Masks need a chat template and character offsets (only fast tokenizers have them)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"tokenizer {name!r} has no chat template: use the target's own "
                                f"instruct tokenizer (chat_template in tokenizer_config.json or "
                                f"chat_template.jinja)")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"tokenizer {name!r} is not a fast (Rust) tokenizer, which the "
                                f"loss mask needs for character offsets: save it with tokenizer.json")


def _check_messages(tokenizer: Any, messages: Sequence[dict[str, Any]], name: str,
                    last_role: str | None, tools: list[dict[str, Any]] | None = None) -> None:
    """Optional system, then user/assistant alternating from user, a tool call followed by its
    results (``eyas.data.tools.FOLLOWS``); ending with a ``last_role`` turn if given (``_ENDS``);
    tools only where the template renders them."""
    if not messages:
        raise ChatTemplateError(f"chat template {name!r}: the conversation has no messages")
    for i, msg in enumerate(messages):
        _check_message(tokenizer, msg, name, i)
    found = order_error(messages)
    if found is not None:
        i, allowed = found
        raise ChatTemplateError(f"{_where(name, i)}: role {turn_kind(messages[i])!r} where "
                                f"{' or '.join(map(repr, allowed))} belongs (optional system, then "
                                f"user/assistant alternating; a tool call is followed by its results)")
    if last_role is not None and turn_kind(messages[-1]) not in _ENDS[last_role]:
        raise ChatTemplateError(f"chat template {name!r}: the conversation must end with a "
                                f"{last_role} turn ({' or '.join(_ENDS[last_role])}), it ends with "
                                f"{turn_kind(messages[-1])!r}")
    if uses_tools(messages, tools):
        _check_tools(tokenizer, messages, tools, name)


def _check_message(tokenizer: Any, msg: Any, name: str, i: int) -> None:
    """One message: its keys, string content, a non-empty reply, no control-token text."""
    calls = isinstance(msg, dict) and msg.get("role") == "assistant" and "tool_calls" in msg
    keys = {"role", "content", "tool_calls"} if calls else {"role", "content"}
    if not isinstance(msg, dict) or set(msg) != keys:
        raise ChatTemplateError(f"{_where(name, i)}: expected a dict with exactly the keys "
                                f"'role' and 'content' (and 'tool_calls' on an assistant turn that "
                                f"calls tools), got {msg!r:.200}")
    if not isinstance(msg["content"], str):
        raise ChatTemplateError(f"{_where(name, i)}: content is "
                                f"{type(msg['content']).__name__}, not str")
    if calls and not (isinstance(msg["tool_calls"], list) and msg["tool_calls"]):
        raise ChatTemplateError(f"{_where(name, i)}: tool_calls must be a non-empty list, got "
                                f"{msg['tool_calls']!r:.200}")
    if msg["role"] == "assistant" and not calls and is_blank(msg["content"]):
        raise ChatTemplateError(f"{_where(name, i)}: empty assistant reply; drop the turn")
    _check_no_control_text(tokenizer, msg["content"], name, i)
    if calls:
        _check_no_control_text(tokenizer, json.dumps(msg["tool_calls"], ensure_ascii=False), name, i)


def _check_tools(tokenizer: Any, messages: Sequence[dict[str, Any]],
                 tools: list[dict[str, Any]] | None, name: str) -> None:
    """A conversation that uses tools needs a template that renders them, and no control text."""
    if not _takes_tools(tokenizer, str(tokenizer.chat_template)):
        calls = sum(turn_kind(m) == "tool_call" for m in messages)
        results = sum(m["role"] == "tool" for m in messages)
        raise TemplateWithoutToolsError(
            f"chat template {name!r} has no tool support (it does not render declared tools, tool "
            f"calls and tool results), and this conversation declares {len(tools or [])} tool(s), "
            f"makes {calls} tool call(s) and has {results} tool result(s): use a target whose "
            f"template takes tools, or leave tool-use data out of data.sources")
    if tools:
        _check_no_control_text(tokenizer, json.dumps(tools, ensure_ascii=False), name, 0)


@functools.lru_cache(maxsize=16)
def _takes_tools(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` renders declared tools, an assistant's tool call and a tool result
    (Llama 3.1/4, Qwen2.5/3 do; stories260k raises, a plain ChatML template drops them)."""
    from jinja2.exceptions import TemplateError

    declared, called, result = _TOOL_PROBES
    tools = [{"type": "function", "function": {"name": declared, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"type": "function", "function": {"name": called, "arguments": {}}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": result}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             date_string=PINNED_DATE_STRING)
    except TemplateError:
        return False
    return all(probe in text for probe in _TOOL_PROBES)


def _check_no_control_text(tokenizer: Any, content: str, name: str, i: int) -> None:
    """Control-token text in a message would be parsed as real turn structure by the tokenizer."""
    for token in _control_token_strings(tokenizer):
        if token in content:
            raise ChatTemplateError(f"{_where(name, i)}: the text contains the control token "
                                    f"{token!r}, which would forge turn structure; remove it "
                                    f"from the message or quarantine the row")


@functools.lru_cache(maxsize=16)
def _control_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """Text of the tokenizer's special added tokens (cached: Llama 4 has over a thousand)."""
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)


@functools.lru_cache(maxsize=16)
def _control_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the special added tokens; an end-of-turn token is one of them."""
    return frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)


def _where(name: str, i: int) -> str:
    return f"chat template {name!r}, message {i}"


# ----------------------------------------------------------------------------- rendering


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], name: str,
            add_generation_prompt: bool, thinking: bool | None = None,
            tools: list[dict[str, Any]] | None = None) -> str:
    """The template's text for ``messages`` (and the declared ``tools``); template failures
    become ChatTemplateError."""
    from jinja2.exceptions import TemplateError

    try:
        extra = {} if thinking is None else {"enable_thinking": thinking}
        return tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             date_string=PINNED_DATE_STRING, **extra)
    except TemplateError as exc:
        roles = [m["role"] for m in messages]
        rejected = [r for r in dict.fromkeys(roles) if not _renders_alone(tokenizer, r)]
        hint = f"it rejects the role {rejected[0]!r}: " if rejected else ""
        raise ChatTemplateError(
            f"chat template {name!r} cannot render a conversation with roles {roles}: {exc}. "
            f"{hint}map or drop that role (e.g. fold a system prompt into the first user turn) "
            f"or quarantine the row") from exc


def _renders_alone(tokenizer: Any, role: str) -> bool:
    """Whether the template renders a one-message conversation with ``role``."""
    from jinja2.exceptions import TemplateError

    try:
        tokenizer.apply_chat_template([{"role": role, "content": "x"}], tokenize=False,
                                      date_string=PINNED_DATE_STRING)
    except TemplateError:
        return False
    return True


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of rendered text, exactly as ``apply_chat_template(tokenize=True)`` encodes it."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- alignment


def _serving_prompt_end(tokenizer: Any, messages: Sequence[dict[str, Any]], turn: int,
                        full_text: str, full_ids: list[int], name: str,
                        thinking: bool | None = None,
                        tools: list[dict[str, Any]] | None = None) -> _Boundary:
    """Where the prompt the target is given for reply ``turn`` ends in the whole conversation."""
    text = _render(tokenizer, messages[:turn], name, add_generation_prompt=True, thinking=thinking,
                   tools=tools)
    if thinking is False and not full_text.startswith(text):
        # Qwen3 with thinking off puts the empty block in the generation prompt but not before
        # earlier replies in the history: there the history's own rendering is what the target
        # reads (and what feature capture runs on), so the prompt without the block is used.
        text = _render(tokenizer, messages[:turn], name, add_generation_prompt=True, thinking=True,
                       tools=tools)
    if not full_text.startswith(text):
        at = _common_prefix_len(full_text, text)
        raise ChatTemplateError(
            f"{_where(name, turn)}: the history rendered with a generation prompt is not a prefix "
            f"of the whole rendered conversation (they differ at character {at}: "
            f"{text[at:at + 40]!r} vs {full_text[at:at + 40]!r}); the template renders earlier "
            f"turns differently once later turns follow, so the loss mask cannot be aligned")
    ids = _encode(tokenizer, text)
    if full_ids[:len(ids)] != ids:
        raise ChatTemplateError(
            f"{_where(name, turn)}: the generation prompt's tokens are not a prefix of the "
            f"conversation's tokens: the reply's first characters merge with the prompt into one "
            f"token (e.g. a reply that starts with whitespace or a newline); strip the reply")
    return _Boundary(char=len(text), token=len(ids))


def _reply_chars(tokenizer: Any, messages: Sequence[dict[str, Any]], turn: int,
                 full_text: str, name: str, thinking: bool | None = None,
                 tools: list[dict[str, Any]] | None = None) -> tuple[int, int]:
    """Character span ``[c0, c1)`` of reply ``turn`` as the template wrote it into ``full_text``
    (a tool call is probed with a text reply too: the span is then the call as written)."""
    starts, ends = [], []
    for probe in _PROBES:
        probed = list(messages)
        probed[turn] = {"role": "assistant", "content": probe}
        text = _render(tokenizer, probed, name, add_generation_prompt=False, thinking=thinking,
                       tools=tools)
        head = _common_prefix_len(full_text, text)
        tail = _common_suffix_len(full_text[head:], text[head:])
        starts.append(head)
        ends.append(len(full_text) - tail)
    return min(starts), max(ends)


def _reply_tokens(full_text: str, ids: list[int], offsets: list[tuple[int, int]],
                  prompt: _Boundary, span: tuple[int, int], limit: int,
                  control_ids: frozenset[int], where: str, thinking: bool | None = None) -> tuple[int, int, int]:
    """``(lo, reply_hi, hi)``: ``[lo, hi)`` is masked 1, the reply's tokens through its
    end-of-turn token; ``[lo, reply_hi)`` are the reply's own tokens without what follows them."""
    c0, c1 = span
    if c1 <= c0:
        raise ChatTemplateError(f"{where}: the template writes nothing of this reply")
    if c0 < prompt.char:
        raise ChatTemplateError(f"{where}: the template writes reply text before the end of the "
                                f"generation prompt (character {c0} < {prompt.char})")
    # What the template writes between the serving prompt and the reply is written by the target
    # when it serves this way (stories260k's ' ', Qwen3's <think> block in thinking mode). With
    # thinking off, Qwen3's empty block is part of the serving prompt already; any other inserted
    # text is then scaffolding the target is given, not trained.
    gap = full_text[prompt.char:c0]
    start_char = c0 if thinking is False and gap.strip() else prompt.char
    lo = prompt.token
    while lo < limit and offsets[lo][1] <= start_char:
        lo += 1
    hi = lo
    while hi < limit and offsets[hi][0] < c1:
        hi += 1
    reply_hi = hi
    # Whitespace the template puts between the reply and its end-of-turn token is the target's.
    while hi < limit and ids[hi] not in control_ids and not full_text[slice(*offsets[hi])].strip():
        hi += 1
    if lo >= hi or hi >= limit or ids[hi] not in control_ids:
        found = full_text[slice(*offsets[hi])] if hi < len(ids) else "the end of the text"
        raise ChatTemplateError(f"{where}: no end-of-turn control token right after the reply "
                                f"(found {found!r}); the template cannot be aligned")
    return lo, reply_hi, hi + 1


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix; compares in chunks so long texts stay fast."""
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + _CHUNK] == b[i:i + _CHUNK]:
        i += _CHUNK
    while i < n and a[i] == b[i]:
        i += 1
    return min(i, n)


def _common_suffix_len(a: str, b: str) -> int:
    """Length of the longest common suffix."""
    return _common_prefix_len(a[::-1], b[::-1])
