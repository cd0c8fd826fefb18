"""Workloads whose lengths are tokens of the served model's tokenizer, as SGLang's
``bench_serving`` counts them, so results can be set next to published numbers.

- ``random`` (``--dataset-name random-ids``): prompt ``i`` is ``L_in(i)`` tokens of random
  text and asks for exactly ``L_out(i)`` tokens; each length is drawn uniformly from
  ``[max(int(range_ratio * len), 1), len]`` (``--random-input-len/--random-output-len/
  --random-range-ratio``). A prompt's length counts the special tokens the tokenizer adds (BOS),
  as the server's prompt-token count does on ``/v1/completions``; so it is at least one more
  than those. On chat endpoints the chat template's tokens come on top.
- ``sharegpt``: the first human turn of each conversation is a prompt and the length in tokens
  of the gpt reply that follows is its output length (or ``output_len`` for all); conversations
  are shuffled with the seed, and those with fewer than 2 prompt or output tokens, or more than
  ``context_len`` together, are skipped.

Every request sends ``max_tokens`` = its output length with ``ignore_eos``, so the server
generates exactly that many tokens. The same seed gives the same prompts with the same
tokenizer.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from eyas.config import ConfigError
from eyas.data.normalize import SHAREGPT_ROLES
from eyas.loadtest.config import WorkloadConfig
from eyas.loadtest.workloads import Prompt, as_prompt, read_rows

MAX_ROUNDS = 32  # decode/re-encode rounds before a random text of exact length is given up
MIN_LEN = 2  # sharegpt: shorter prompts or replies (in tokens) are skipped, as bench_serving does


def workload_tokenizer(cfg: WorkloadConfig, model: str | None) -> Any:
    """The tokenizer lengths are counted in: ``workload.tokenizer``, else the first endpoint's
    model where ``eyas.targets`` finds it on this machine (a registered target, an asset or a
    local directory)."""
    from transformers import AutoTokenizer

    from eyas.targets import resolve_target

    if cfg.tokenizer:
        key, value = "loadtest.workload.tokenizer", cfg.tokenizer
    elif model:
        key, value = "loadtest.endpoints[0].model", model
    else:
        raise ConfigError(f"workload.kind={cfg.kind} counts tokens: set loadtest.workload.tokenizer")
    hint = (f"workload.kind={cfg.kind} counts tokens of the served model's tokenizer: set "
            "loadtest.workload.tokenizer to its local directory or a registered target (e.g. "
            "assets:tokenizers/llama-3.1-instruct, smollm2-135m-instruct)")
    try:
        return AutoTokenizer.from_pretrained(resolve_target(value, key))
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        raise ConfigError(f"{key}={value!r} gives no tokenizer ({exc}); {hint}") from None


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens the server counts for ``text`` as a completion prompt (special tokens included)."""
    return len(tokenizer(text)["input_ids"])


def text_pool(tokenizer: Any) -> list[int]:
    """Token ids random text is drawn from, ascending: not special or added tokens, and decoding
    alone to visible text (no whitespace-only pieces, no partial UTF-8 byte tokens)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = sorted(i for i in tokenizer.get_vocab().values() if i not in special)
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [i for i, t in zip(ids, texts, strict=True) if t.strip() and "\ufffd" not in t]


def draw_lens(rng: random.Random, full_len: int, range_ratio: float, n: int,
              low: int = 1) -> list[int]:
    """``n`` lengths uniform in ``[max(int(range_ratio * full_len), low), full_len]``."""
    return [rng.randint(max(int(range_ratio * full_len), low), full_len) for _ in range(n)]


def text_of_length(tokenizer: Any, pool: list[int], n_tokens: int, n_special: int,
                   rng: random.Random) -> str:
    """Random text the tokenizer encodes to exactly ``n_tokens`` tokens (``n_special`` of them
    added by the tokenizer). Decoding random ids and encoding the text again can merge or split
    pieces; the re-encoded ids are then cut, or topped up with fresh random ids, and decoded
    again until the count is exact (one or two rounds in practice)."""
    want = n_tokens - n_special
    ids = rng.choices(pool, k=want)
    for _ in range(MAX_ROUNDS):
        text = tokenizer.decode(ids)
        if token_count(tokenizer, text) == n_tokens:
            return text
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = got[:want] + rng.choices(pool, k=max(0, want - len(got)))
    raise RuntimeError(f"no random text of exactly {n_tokens} tokens after {MAX_ROUNDS} rounds "
                       f"with tokenizer {tokenizer.name_or_path}")


def random_prompts(cfg: WorkloadConfig, seed: int, tokenizer: Any, output_len: int) -> list[Prompt]:
    """``num_prompts`` random-text prompts of ``input_len`` tokens, each asking for
    ``output_len`` tokens, both drawn within ``range_ratio`` (see the module docstring)."""
    n_special = token_count(tokenizer, "")
    if cfg.input_len <= n_special:
        raise ConfigError(f"workload.input_len={cfg.input_len} leaves no room for text: the "
                          f"tokenizer adds {n_special} special token(s) to every prompt; set "
                          f"workload.input_len >= {n_special + 1}")
    rng = random.Random(seed)
    in_lens = draw_lens(rng, cfg.input_len, cfg.range_ratio, cfg.num_prompts, low=n_special + 1)
    out_lens = draw_lens(rng, output_len, cfg.range_ratio, cfg.num_prompts)
    pool = text_pool(tokenizer)
    return [as_prompt(text_of_length(tokenizer, pool, n_in, n_special, rng), cfg.chat, n_out)
            for n_in, n_out in zip(in_lens, out_lens, strict=True)]


def sharegpt_turn(turn: Any) -> tuple[str | None, str]:
    """(role, text) of one ShareGPT turn, the role normalized (``human`` -> ``user``, ``gpt``
    -> ``assistant``); role None when the turn is not one."""
    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
        return SHAREGPT_ROLES.get(str(turn.get("from")).lower()), turn["value"]
    return None, ""


def first_exchange(row: Any, where: str) -> tuple[str, str] | None:
    """The first human turn of a ShareGPT row and the gpt reply that follows it; None when the
    conversation has no such pair (it is skipped, as bench_serving skips short ones)."""
    turns = row.get("conversations", row.get("conversation")) if isinstance(row, dict) else None
    if not isinstance(turns, list):
        raise ConfigError(f"{where}: not a ShareGPT row (loadtest.workload.path); expected "
                         "{conversations: [{from: human|gpt, value: ...}, ...]}")
    pairs = [sharegpt_turn(t) for t in turns]
    for (role, ask), (reply_role, reply) in itertools.pairwise(pairs):
        if role == "user":
            return (ask, reply) if reply_role == "assistant" else None
    return None


def sharegpt_exchanges(path: str) -> list[tuple[str, str]]:
    """(prompt, reply) of every conversation in the ShareGPT file at ``path`` that has one."""
    from eyas.assets import resolve_asset

    rows = read_rows(resolve_asset(path, "loadtest.workload.path"))
    pairs = [first_exchange(row, f"{path} row {i}") for i, row in enumerate(rows)]
    return [p for p in pairs if p is not None]


def sharegpt_prompts(cfg: WorkloadConfig, seed: int, tokenizer: Any) -> list[Prompt]:
    """Up to ``num_prompts`` shuffled ShareGPT first exchanges within the length filters."""
    assert cfg.path is not None  # guaranteed by WorkloadConfig validation
    pairs = sharegpt_exchanges(cfg.path)
    random.Random(seed).shuffle(pairs)
    prompts: list[Prompt] = []
    for ask, reply in pairs:
        if len(prompts) == cfg.num_prompts:
            break
        n_in = token_count(tokenizer, ask)
        n_out = cfg.output_len or len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        if n_in < MIN_LEN or n_out < MIN_LEN or (cfg.context_len and n_in + n_out > cfg.context_len):
            continue
        prompts.append(as_prompt(ask, cfg.chat, n_out))
    if not prompts:
        within = f" within workload.context_len={cfg.context_len}" if cfg.context_len else ""
        raise ConfigError(f"workload.path={cfg.path!r}: no conversation has a human turn and a gpt "
                         f"reply of >= {MIN_LEN} tokens each{within}")
    return prompts
