"""Prompts for a load test: read from a file, or generated deterministically from a seed.

A prompt is either chat ``messages`` (for /v1/chat/completions) or plain ``text`` (for
/v1/completions); ``load_prompts`` returns the kind the workload's ``chat`` flag asks for.
Synthetic prompts are made of words from a fixed pseudo-English vocabulary, so the same seed
gives the same prompts on every machine and every run. The ``random`` and ``sharegpt`` kinds,
whose lengths are tokens of the served model's tokenizer, live in ``token_workloads``.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any

from eyas import storage
from eyas.loadtest.config import WorkloadConfig

_SYLLABLES = ["ka", "lo", "mi", "ne", "ta", "ri", "so", "vu", "pe", "da", "gi", "ho", "ba", "zu"]


@dataclass(frozen=True)
class Prompt:
    """One request's input: chat messages or completion text (exactly one is set), and the
    tokens to generate when the workload fixes them (sent as max_tokens with ignore_eos; None:
    the load test's max_tokens)."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    output_len: int | None = None


def random_words(rng: random.Random, n: int) -> str:
    """``n`` space-separated pseudo-words of two or three syllables."""
    words = ("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))) for _ in range(n))
    return " ".join(words)


def as_prompt(text: str, chat: bool, output_len: int | None = None) -> Prompt:
    """A user turn for chat endpoints, plain text for completion endpoints."""
    if chat:
        return Prompt(messages=[{"role": "user", "content": text}], output_len=output_len)
    return Prompt(text=text, output_len=output_len)


def synthetic_prompts(cfg: WorkloadConfig, seed: int) -> list[Prompt]:
    """``num_prompts`` independent prompts of ``input_len`` words."""
    rng = random.Random(seed)
    return [as_prompt(random_words(rng, cfg.input_len), cfg.chat) for _ in range(cfg.num_prompts)]


def shared_prefix_prompts(cfg: WorkloadConfig, seed: int) -> list[Prompt]:
    """One ``prefix_len``-word prefix shared by all prompts, then ``input_len`` unique words."""
    rng = random.Random(seed)
    prefix = random_words(rng, cfg.prefix_len)
    texts = [f"{prefix}\n\n{random_words(rng, cfg.input_len)}" for _ in range(cfg.num_prompts)]
    return [as_prompt(t, cfg.chat) for t in texts]


def read_rows(uri: str) -> list[Any]:
    """Rows of a .jsonl, .json (a list) or .parquet file at a local path or URI."""
    data = storage.read_bytes(uri)
    if uri.endswith(".jsonl"):
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    if uri.endswith(".json"):
        rows = json.loads(data)
        if not isinstance(rows, list):
            raise ValueError(f"{uri}: a .json prompts file must hold a list of rows")
        return rows
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    raise ValueError(f"{uri}: unsupported prompts file; use .jsonl, .json or .parquet")


def row_to_prompt(row: Any, chat: bool, where: str) -> Prompt:
    """A row is a string, or a mapping with ``messages`` (chat only), ``prompt``, ``text`` or
    ``turns`` (MT-bench style: the first turn is the prompt)."""
    if isinstance(row, str):
        return as_prompt(row, chat)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a string or an object, got {type(row).__name__}")
    if row.get("messages") is not None:
        if not chat:
            raise ValueError(f"{where} has messages but workload.chat is false: set it to true")
        return Prompt(messages=[{"role": m["role"], "content": m["content"]} for m in row["messages"]])
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return as_prompt(row[key], chat)
    turns = row.get("turns")  # MT-bench / Vicuna-bench / EAGLE question files: the first turn
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return as_prompt(turns[0], chat)
    raise ValueError(f"{where}: no 'messages', 'prompt', 'text' or 'turns' field "
                     f"(keys: {sorted(row)})")


def file_prompts(cfg: WorkloadConfig) -> list[Prompt]:
    """The first ``num_prompts`` rows of ``cfg.path``."""
    assert cfg.path is not None  # guaranteed by WorkloadConfig validation
    from eyas.assets import resolve_asset

    rows = read_rows(resolve_asset(cfg.path, "loadtest.workload.path"))[: cfg.num_prompts]
    if not rows:
        raise ValueError(f"{cfg.path} holds no prompts: point workload.path at a non-empty file")
    return [row_to_prompt(r, cfg.chat, f"{cfg.path} row {i}") for i, r in enumerate(rows)]


def load_prompts(cfg: WorkloadConfig, seed: int, model: str | None = None,
                 max_tokens: int = 256) -> list[Prompt]:
    """The workload's prompts, in a fixed order (request ``i`` of a point uses prompt ``i % n``).

    ``model`` (the first endpoint's) names the tokenizer of the token-counted kinds when
    ``workload.tokenizer`` is unset; ``max_tokens`` is ``random``'s output length when
    ``workload.output_len`` is unset.
    """
    if cfg.kind == "prompts_file":
        return file_prompts(cfg)
    if cfg.kind == "shared_prefix":
        return shared_prefix_prompts(cfg, seed)
    if cfg.kind == "synthetic":
        return synthetic_prompts(cfg, seed)
    from eyas.loadtest import token_workloads

    tokenizer = token_workloads.workload_tokenizer(cfg, model)
    if cfg.kind == "random":
        return token_workloads.random_prompts(cfg, seed, tokenizer, cfg.output_len or max_tokens)
    return token_workloads.sharegpt_prompts(cfg, seed, tokenizer)
