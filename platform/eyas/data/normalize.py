"""Reading prompt files and normalizing their records to one conversation schema.

Every record becomes a row ``{id, source, messages_json, tools_json, status, reason, detail,
raw_json, raw_sha256}``. ``messages`` is a list of ``{"role": "system"|"user"|"assistant",
"content": str | None}``; ``content=None`` on an assistant turn marks a reply still to be
generated (MT-bench and plain prompt datasets carry no replies). ``status`` is ``ok`` or
``quarantined``; a quarantined row keeps its raw record and a reason code so nothing is lost
silently.

Tool use (ShareGPT ``function_call``/``observation`` turns as in glaive-function-calling, or
OpenAI ``tool_calls``/``tool`` messages) becomes OpenAI-style messages: a call is
``{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
{"name": str, "arguments": dict}}]}``, a result ``{"role": "tool", "content": str}``. A record's
``tools`` (a JSON string or a list of function definitions) becomes ``tools_json``, a JSON list
of ``{"type": "function", "function": {...}}`` ("" when it declares none), which the chat
template is given. Arguments are a dict, as Hugging Face chat templates render them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import PurePosixPath
from typing import Any

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool"}
SHAREGPT_CALL = "function_call"  # a ShareGPT turn holding a tool call as JSON
MESSAGE_ROLES = {"system", "user", "assistant", "tool"}
PROMPT_KEYS = ("prompt", "question", "text")
ID_KEYS = ("id", "question_id", "conversation_id", "uuid")


class RecordError(ValueError):
    """A record cannot be normalized; ``code`` is the quarantine reason."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


# Raw text kept in a quarantine row (and in a JSONL line that did not parse), in characters;
# its sha256 identifies the whole record.
RAW_JSON_CAP = 20_000


class UnreadableFile(ValueError):
    """A whole prompt file cannot be decoded; it is listed in the manifest as ``unreadable_file``."""


def parse_file(data: bytes, path: str) -> list[Any]:
    """Decode one file into its records: ``.jsonl`` (one JSON per line), ``.json`` (a list, or one
    object), ``.parquet``. A JSONL line that is not JSON (or not UTF-8) becomes a
    ``{"__unparsable__": line}`` record so the caller can quarantine it with its line number."""
    return [record for _, record in parse_file_lines(data, path)]


def parse_file_lines(data: bytes, path: str) -> list[tuple[int, Any]]:
    """``parse_file`` with each record's position: its 1-based line in a JSONL file, else its
    1-based index. Raises ``UnreadableFile`` naming the file when it cannot be decoded at all,
    ``RecordError("unsupported_file")`` for another extension."""
    suffix = PurePosixPath(path).suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), 1))
        if suffix == ".jsonl":
            return [(i + 1, _parse_line(line, i)) for i, line in enumerate(data.splitlines()) if line.strip()]
        if suffix == ".json":
            obj = json.loads(data.decode("utf-8"))
            return list(enumerate(obj if isinstance(obj, list) else [obj], 1))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, ValueError) as exc:
        # pyarrow raises ArrowInvalid (a ValueError) or OSError on a corrupt Parquet file.
        raise UnreadableFile(f"{path}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    raise RecordError("unsupported_file", f"{path}: expected .jsonl, .json or .parquet")


def _parse_line(line: bytes, lineno: int) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        text = line.decode("utf-8", errors="replace")
        return {"__unparsable__": text[:2000], "__line__": lineno + 1, "__code__": "invalid_encoding",
                "__error__": f"not UTF-8 ({exc.reason} at byte {exc.start})"}
    except json.JSONDecodeError as exc:
        return {"__unparsable__": line.decode("utf-8")[:2000], "__line__": lineno + 1, "__error__": str(exc)}


def check_object(record: Any) -> None:
    """Reject what is not a JSON object (or a JSONL line that did not parse)."""
    if not isinstance(record, dict):
        raise RecordError("unknown_shape", f"record is a {type(record).__name__}, not an object")
    if "__unparsable__" in record:
        code = record.get("__code__", "invalid_json")
        raise RecordError(code, f"line {record['__line__']}: {record['__error__']}")


def detect_format(record: dict) -> str:
    """Name the shape of one record (see ``SourceFormat``)."""
    for key, fmt in (("conversations", "sharegpt"), ("messages", "messages"), ("instruction", "alpaca"),
                     ("turns", "mt_bench")):
        if key in record:
            return fmt
    if any(key in record for key in PROMPT_KEYS):
        return "prompt"
    raise RecordError("unknown_shape", f"no conversations/messages/instruction/turns/prompt key in {sorted(record)[:8]}")


def _turns_to_messages(turns: Any, key: str) -> list[dict[str, Any]]:
    """User turns each followed by a reply slot to be generated."""
    if not isinstance(turns, list):
        raise RecordError("non_string_content", f"{key} is a {type(turns).__name__}, not a list")
    out: list[dict[str, Any]] = []
    for turn in turns:
        out += [{"role": "user", "content": turn}, {"role": "assistant", "content": None}]
    return out


def _sharegpt(record: dict) -> list[dict[str, Any]]:
    convs = record["conversations"]
    if not isinstance(convs, list):
        raise RecordError("unknown_shape", "conversations is not a list")
    out = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn:
            raise RecordError("unknown_shape", f"conversations[{i}] has no 'from'")
        source = str(turn["from"]).lower()
        if source == SHAREGPT_CALL:
            out.append(tool_call_message(turn.get("value")))
            continue
        role = SHAREGPT_ROLES.get(source)
        if role is None:
            raise RecordError("unknown_role", f"conversations[{i}].from={turn['from']!r}")
        out.append({"role": role, "content": turn.get("value")})
    return out


def _messages(record: dict) -> list[dict[str, Any]]:
    msgs = record["messages"]
    if not isinstance(msgs, list):
        raise RecordError("unknown_shape", "messages is not a list")
    out = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or "role" not in msg:
            raise RecordError("unknown_shape", f"messages[{i}] has no 'role'")
        if msg["role"] not in MESSAGE_ROLES:
            raise RecordError("unknown_role", f"messages[{i}].role={msg['role']!r}")
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            out.append({"role": "assistant", "content": msg.get("content") or "",
                        "tool_calls": parse_tool_calls(msg["tool_calls"])})
            continue
        out.append({"role": msg["role"], "content": msg.get("content")})
    return out


def _alpaca(record: dict) -> list[dict[str, Any]]:
    instruction, extra = record.get("instruction"), record.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise RecordError("non_string_content", "instruction/input must be strings")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    reply = record.get("output")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply or None}]


def _prompt(record: dict) -> list[dict[str, Any]]:
    key = next(k for k in PROMPT_KEYS if k in record)
    return [{"role": "user", "content": record[key]}, {"role": "assistant", "content": None}]


def _mt_bench(record: dict) -> list[dict[str, Any]]:
    return _turns_to_messages(record["turns"], "turns")


# ----------------------------------------------------------------------------- tool use


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """A record's ``tools`` (a JSON string or a list of function definitions) -> OpenAI-style
    tools, or None when it declares none. Raises ``RecordError("invalid_tools")``."""
    if value in (None, "", []):
        return None
    tools = _json_value(value, "invalid_tools", "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("invalid_tools", f"tools is a {type(tools).__name__}, not a list of objects")
    out = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    for i, tool in enumerate(out):
        if not isinstance(tool["function"], dict) or not isinstance(tool["function"].get("name"), str):
            raise RecordError("invalid_tools", f"tools[{i}] has no function name")
    return out or None


def tool_call_message(value: Any) -> dict[str, Any]:
    """A ShareGPT ``function_call`` turn (``{"name", "arguments"}``, or a list of them, as JSON)
    -> an assistant message with ``tool_calls``. Raises ``RecordError("invalid_tool_call")``."""
    calls = _json_value(value, "invalid_tool_call", "function_call")
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", "content": "", "tool_calls": parse_tool_calls(calls)}


def parse_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` or bare ``{"name", "arguments"}`` calls -> normalized calls with
    dict arguments. Raises ``RecordError("invalid_tool_call")``."""
    if not isinstance(calls, list) or not calls:
        raise RecordError("invalid_tool_call", "tool_calls must be a non-empty list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError("invalid_tool_call", f"tool call {i} has no function name: {call!r:.200}")
        arguments = _json_value(function.get("arguments", {}), "invalid_tool_call",
                                f"tool call {i} arguments")
        if not isinstance(arguments, dict):
            raise RecordError("invalid_tool_call",
                              f"tool call {i} arguments are a {type(arguments).__name__}, not an object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _json_value(value: Any, code: str, what: str) -> Any:
    """``value`` itself, or the JSON it holds when it is a string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RecordError(code, f"{what} is not valid JSON ({exc}): {value!r:.200}") from None


CONVERTERS = {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca, "mt_bench": _mt_bench,
              "prompt": _prompt}


def record_id(source: str, record: Any, index: int) -> str:
    """Stable id: the record's own id when it has one, else a hash of its content."""
    if isinstance(record, dict):
        for key in ID_KEYS:
            if record.get(key) not in (None, ""):
                return f"{source}:{record[key]}"
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    return f"{source}:{index}-{hashlib.sha1(blob).hexdigest()[:10]}"


def normalize_record(record: Any, source: str, index: int, fmt: str = "auto") -> dict[str, Any]:
    """One raw record -> one row (``status`` ok or quarantined, never an exception)."""
    row = {"id": record_id(source, record, index), "source": source, "messages_json": "", "tools_json": "",
           "status": "ok", "reason": "", "detail": "", "raw_json": "", "raw_sha256": ""}
    try:
        check_object(record)
        shape = detect_format(record) if fmt == "auto" else fmt
        row["messages_json"] = json.dumps(CONVERTERS[shape](record), ensure_ascii=False)
        tools = parse_tools(record.get("tools"))
        row["tools_json"] = json.dumps(tools, ensure_ascii=False) if tools else ""
    except (RecordError, KeyError) as exc:  # KeyError: a forced format's key is missing
        code, detail = (exc.code, exc.detail) if isinstance(exc, RecordError) else ("unknown_shape", repr(exc))
        raw = json.dumps(record, ensure_ascii=False, default=str)
        row.update(status="quarantined", reason=code, detail=detail, raw_json=raw[:RAW_JSON_CAP],
                   raw_sha256=sha256_text(raw))
    return row


def sha256_text(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes: identifies a quarantined record without its content."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def source_name(path: str, configured: str) -> str:
    """The configured source name, else the file stem."""
    return configured or PurePosixPath(path).stem
