"""The data stage's per-batch steps, as Ray Data callable classes.

Each class does its heavy setup (tokenizer, detector, model) in ``__init__`` and transforms a
``pyarrow.Table`` batch in ``__call__``. Rows carry a ``status``: ``ok`` rows are processed,
``quarantined`` (bad input) and ``filtered`` (policy) rows pass through untouched with their
reason, so the stage can count and write every one of them.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pyarrow as pa

from eyas import metrics
from eyas.data.config import DataConfig
from eyas.data.normalize import (
    RAW_JSON_CAP,
    RecordError,
    UnreadableFile,
    normalize_record,
    parse_file_lines,
    sha256_text,
)
from eyas.data.tools import merge_pii_texts, pii_texts, text_reply_positions
from eyas.data.validate import is_blank, validate_messages
from eyas.runtime import actor_threads, use_torch_threads
from eyas.targets import resolve_target

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("messages_json", pa.string()), ("tools_json", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("raw_json", pa.string()),
    ("raw_sha256", pa.string()),
    ("pii_hits_json", pa.string()), ("generated_tokens", pa.int64()), ("finish_reasons", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
    ("num_tokens", pa.int32()), ("num_loss_tokens", pa.int32()),
])
DEFAULTS: dict[str, Any] = {"file": "", "line": 0, "messages_json": "", "tools_json": "", "status": "ok",
                            "reason": "", "detail": "", "raw_json": "", "raw_sha256": "",
                            "pii_hits_json": "{}", "generated_tokens": 0, "finish_reasons": "",
                            "input_ids": [], "loss_mask": [], "num_tokens": 0, "num_loss_tokens": 0}


def to_rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table with the fixed schema (missing or null columns get their defaults: Ray
    fills a column some rows of a block lack with nulls)."""
    return pa.Table.from_pylist([{**DEFAULTS, **{k: v for k, v in r.items() if v is not None}} for r in rows],
                                schema=ROW_SCHEMA)


def set_status(row: dict[str, Any], status: str, reason: str, detail: str) -> None:
    """Mark a row quarantined/filtered, keeping what it held (capped at ``RAW_JSON_CAP``
    characters, with the whole text's sha256) so it can be written with its reason."""
    if not row["raw_json"]:
        raw = row["messages_json"]
        if row.get("tools_json"):  # the declared tools are part of the conversation
            raw = f'{{"messages": {raw}, "tools": {row["tools_json"]}}}'
        row["raw_json"] = raw[:RAW_JSON_CAP]
        row["raw_sha256"] = sha256_text(raw)
    row.update(status=status, reason=reason, detail=detail[:2000])


def messages_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(row["messages_json"])


def tools_of(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tools the conversation declares (``eyas.data.normalize``), or None."""
    return json.loads(row["tools_json"]) if row.get("tools_json") else None


def count_rows(stage: str, rows: list[dict[str, Any]]) -> None:
    for status in ("ok", "quarantined", "filtered"):
        metrics.inc("eyas_data_rows_total", sum(r["status"] == status for r in rows),
                    "rows leaving each data step, by status", step=stage, status=status)


def read_file_rows(item: dict[str, Any], source: str, fmt: str, limit: int | None) -> list[dict[str, Any]]:
    """``read_binary_files`` row {bytes, path} -> normalized rows of that file (at most ``limit``).

    A file that cannot be decoded at all (empty or truncated JSON, binary, not UTF-8, corrupt
    Parquet) becomes ONE quarantined row with reason ``unreadable_file`` naming it, so the run
    goes on and the manifest lists it."""
    path = item["path"]
    try:
        records = parse_file_lines(item["bytes"], path)
    except (UnreadableFile, RecordError) as exc:
        row = {"id": f"{source}:unreadable:{path.rsplit('/', 1)[-1]}", "source": source, "messages_json": "",
               "status": "quarantined", "reason": "unreadable_file", "detail": str(exc)[:2000],
               "raw_json": "", "raw_sha256": hashlib.sha256(item["bytes"]).hexdigest(), "file": path, "line": 0}
        metrics.inc("eyas_data_rows_read_total", 1, "records read from prompt files", source=source)
        return [row]
    records = records[:limit] if limit else records
    rows = []
    for i, (line, rec) in enumerate(records):
        row = normalize_record(rec, source, i, fmt)
        row.update(file=path, line=line)
        rows.append(row)
    metrics.inc("eyas_data_rows_read_total", len(rows), "records read from prompt files", source=source)
    return rows


def load_tokenizer_for(cfg: DataConfig) -> tuple[Any, str]:
    from eyas.data.chat import load_tokenizer

    key = "data.tokenizer" if cfg.tokenizer else "data.target"
    path = resolve_target(cfg.tokenizer or cfg.target, key)
    return load_tokenizer(path), path


def fill_slots(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A one-word stand-in for replies still to be generated, so the template can be tried and
    the prompt side counted before any generation is spent."""
    return [{**m, "content": "ok" if m["content"] is None else m["content"]} for m in messages]


class Validator:
    """Structure checks, then a trial rendering with the target's template to catch template
    errors and conversations that cannot fit ``max_length`` before any generation is spent."""

    def __init__(self, cfg: DataConfig):
        from eyas.data.chat import ChatTemplateError, count_prompt_tokens

        self.cfg, self.regenerate = cfg, cfg.generation.mode == "regenerate"
        self.tokenizer, self.template_name = load_tokenizer_for(cfg)
        self.count, self.template_error = count_prompt_tokens, ChatTemplateError

    def check(self, row: dict[str, Any]) -> None:
        messages = validate_messages(messages_of(row), self.regenerate, self.cfg.max_turns, self.cfg.char_cap)
        row["messages_json"] = json.dumps(messages, ensure_ascii=False)
        try:  # one rendering (linear in the record); the Templater aligns the mask per turn later
            n = self.count(self.tokenizer, fill_slots(messages), self.template_name,
                           enable_thinking=self.cfg.template.enable_thinking, tools=tools_of(row))
        except self.template_error as exc:  # template_error, or template_without_tools
            raise RecordError(exc.code, str(exc)) from exc
        if n > self.cfg.max_length:
            raise RecordError("too_long", f"{n} tokens before any reply > data.max_length={self.cfg.max_length}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = to_rows(batch)
        for row in rows:
            if row["status"] == "ok":
                try:
                    self.check(row)
                except RecordError as exc:
                    set_status(row, "quarantined", exc.code, exc.detail)
        count_rows("validate", rows)
        return to_table(rows)


class PiiScrubber:
    """Detect PII in every text of the batch in one backend call; redact or drop by policy.

    A dropped conversation is written to quarantine with its info types only: its text is
    removed so no raw PII leaves the dataset. Rows quarantined before this step (bad input)
    carry raw text too: their ``raw_json`` and ``detail`` go through the same policy (redacted;
    emptied where a drop type is found), so ``quarantine/`` is no store of personal data."""

    def __init__(self, cfg: DataConfig):
        from eyas.pii.base import build_backend

        self.cfg, self.backend = cfg, build_backend(cfg.pii)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from eyas.pii.base import scrub_conversations

        rows = to_rows(batch)
        live = [r for r in rows if r["status"] == "ok"]
        if self.backend is not None and live:
            convs = [messages_of(r) for r in live]
            texts = [pii_texts(c) for c in convs]
            for row, conv, result in zip(live, convs, scrub_conversations(texts, self.backend, self.cfg.pii), strict=True):
                self._apply(row, conv, result)
        held = [r for r in rows if r["status"] == "quarantined" and (r["raw_json"] or r["detail"])]
        if self.backend is not None and held:
            self._scrub_quarantined(held)
        count_rows("pii", rows)
        return to_table(rows)

    def _scrub_quarantined(self, rows: list[dict[str, Any]]) -> None:
        from eyas.pii.base import scrub_conversations

        texts = [[{"role": "user", "content": r["raw_json"]}, {"role": "user", "content": r["detail"]}]
                 for r in rows]
        for row, result in zip(rows, scrub_conversations(texts, self.backend, self.cfg.pii), strict=True):
            raw, detail = (m["content"] for m in result.messages)
            row.update(raw_json="" if result.dropped else raw, detail=detail)

    def _apply(self, row: dict[str, Any], conv: list[dict[str, Any]], result: Any) -> None:
        row["pii_hits_json"] = json.dumps(result.hits)
        for info_type, n in result.hits.items():
            metrics.inc("eyas_data_pii_hits_total", n, "PII findings by info type", info_type=info_type)
        merged = None if result.dropped else merge_pii_texts(conv, result.messages)
        if merged is None:
            detail = result.reason or "redacting PII broke the JSON of a tool call's arguments"
            row.update(status="filtered", reason="pii_drop", detail=detail, messages_json="", raw_json="")
            return
        row["messages_json"] = json.dumps(merged, ensure_ascii=False)


class Regenerator:
    """Replace every assistant reply with the target's own, turn by turn (see ``regenerate``)."""

    def __init__(self, cfg: DataConfig, cache_uri: str | None = None):
        from eyas.data.chat import generation_prompt_ids
        from eyas.data.regenerate import BACKENDS, ReplyCache

        self.cfg = cfg.generation
        self.threads = actor_threads(self.cfg.torch_threads, self.cfg.num_cpus_per_actor)
        self.tokenizer, _ = load_tokenizer_for(cfg)
        model_path = resolve_target(cfg.target, "data.target")
        self.backend = BACKENDS[self.cfg.engine](model_path, self.tokenizer, self.cfg)
        thinking = cfg.template.enable_thinking
        self.prompt_ids = lambda history, tools: generation_prompt_ids(self.tokenizer, history,
                                                                       enable_thinking=thinking, tools=tools)
        self.done = 0  # conversations this actor regenerated (its progress line)
        self.cache = ReplyCache(cache_uri, cfg.target, self.cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from eyas.data.regenerate import regenerate_cached

        use_torch_threads(self.threads)
        rows = to_rows(batch)
        live = [r for r in rows if r["status"] == "ok"]
        start = time.perf_counter()
        results, cached = regenerate_cached([messages_of(r) for r in live], self.backend,
                                            self.prompt_ids, self.cache, [tools_of(r) for r in live])
        for row, res in zip(live, results, strict=True):
            row.update(messages_json=json.dumps(res.messages, ensure_ascii=False),
                       finish_reasons=",".join(res.finish_reasons), generated_tokens=res.generated_tokens)
            self._filter(row, res)
        tokens = sum(r.generated_tokens for r, hit in zip(results, cached, strict=True) if not hit)
        seconds = time.perf_counter() - start
        self._record(tokens, seconds)
        self.done += len(live)
        print(f"[eyas.data] regenerated {self.done} conversations so far (+{len(live)}, "
              f"{sum(cached)} from the resume cache; {tokens} new tokens in {seconds:.0f} s)", flush=True)
        count_rows("regenerate", rows)
        return to_table(rows)

    def _filter(self, row: dict[str, Any], res: Any) -> None:
        if "abort" in res.finish_reasons:
            set_status(row, "filtered", "generation_aborted", "the engine aborted a reply")
        elif "length" in res.finish_reasons and not self.cfg.keep_truncated:
            set_status(row, "filtered", "truncated_reply",
                       f"a reply hit generation.max_new_tokens={self.cfg.max_new_tokens}")
        elif any(m["role"] == "assistant" and not m.get("tool_calls") and is_blank(m["content"])
                 for m in res.messages):
            set_status(row, "filtered", "empty_reply", "the target produced an empty reply")

    @staticmethod
    def _record(tokens: int, seconds: float) -> None:
        metrics.inc("eyas_data_generated_tokens_total", tokens, "reply tokens generated by the target")
        if seconds > 0 and tokens:
            metrics.set_gauge("eyas_data_generation_tokens_per_s", tokens / seconds,
                              "reply tokens/s of one generation actor (last batch)")


class Templater:
    """Chat template + tokenize + assistant loss mask with the target's own tokenizer."""

    def __init__(self, cfg: DataConfig):
        from eyas.data.chat import ChatTemplateError, tokenize_conversation

        self.cfg = cfg
        self.tokenizer, self.template_name = load_tokenizer_for(cfg)
        self.tokenize, self.template_error = tokenize_conversation, ChatTemplateError

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = to_rows(batch)
        for row in rows:
            if row["status"] == "ok":
                self._tokenize(row)
        count_rows("template", rows)
        return to_table(rows)

    def _tokenize(self, row: dict[str, Any]) -> None:
        # Replies cut by max_new_tokens (kept when generation.keep_truncated): the target never
        # ended those turns, so their end-of-turn token is not trained (masked 0).
        # Finish reasons are per generated reply: the text replies, not the kept tool calls.
        messages = messages_of(row)
        replies = text_reply_positions(messages)
        cut = {replies[k] for k, reason in enumerate(row["finish_reasons"].split(",")) if reason == "length"}
        try:
            tok = self.tokenize(self.tokenizer, messages, self.template_name, unfinished=cut,
                                enable_thinking=self.cfg.template.enable_thinking, tools=tools_of(row))
        except self.template_error as exc:
            set_status(row, "quarantined", exc.code, str(exc))
            return
        if tok.num_tokens > self.cfg.max_length:
            set_status(row, "quarantined", "too_long", f"{tok.num_tokens} tokens > data.max_length={self.cfg.max_length}")
            return
        row.update(input_ids=tok.input_ids, loss_mask=tok.loss_mask, num_tokens=tok.num_tokens,
                   num_loss_tokens=tok.num_loss_tokens)
