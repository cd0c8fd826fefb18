"""Which data rows become which feature rows: the eval split and the max_length overflow rule.

Pure functions of ids and lengths (no Ray, no torch), used both per batch inside the pipeline
and up front by the stage to count what it will write.

- Eval split: a row goes to ``eval`` when the first 8 bytes of sha256(id), read as a fraction
  of 2**64, fall below ``eval_fraction``. Deterministic across runs, machines and Python hash
  seeds; every piece of a split conversation stays in its conversation's split.
- Overflow (rows longer than ``max_length``): ``truncate`` keeps the first ``max_length``
  tokens; ``split`` cuts the row into consecutive pieces of at most ``max_length`` tokens, ids
  ``<id>#<k>``, each run through the target as its own sequence (positions restart at 0);
  ``drop`` skips the row.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pyarrow as pa

SPLITS = ("train", "eval")
INPUT_SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                          ("loss_mask", pa.list_(pa.int8()))])


def split_of(row_id: str, eval_fraction: float) -> str:
    """``"eval"`` for a deterministic ``eval_fraction`` of ids (by sha256), else ``"train"``."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def pieces(num_tokens: int, max_length: int, overflow: str) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the feature rows made from one data row ([] = dropped)."""
    if num_tokens == 0:
        return []
    if num_tokens <= max_length:
        return [(0, num_tokens)]
    if overflow == "truncate":
        return [(0, max_length)]
    if overflow == "split":
        return [(s, min(s + max_length, num_tokens)) for s in range(0, num_tokens, max_length)]
    if overflow == "drop":
        return []
    raise ValueError(f"features.overflow={overflow!r}: use truncate, split or drop")


def piece_id(row_id: str, k: int, num_pieces: int, overflow: str) -> str:
    """A split row's pieces are ``<id>#0``, ``<id>#1``...; any other row keeps its id."""
    return f"{row_id}#{k}" if overflow == "split" and num_pieces > 1 else row_id


def select_rows(batch: pa.Table, split: str, eval_fraction: float, max_length: int,
                overflow: str) -> pa.Table:
    """Data rows (id, input_ids, loss_mask) -> this split's rows after the overflow rule."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    out: list[dict[str, Any]] = []
    for row in batch.select(["id", "input_ids", "loss_mask"]).to_pylist():
        if split_of(row["id"], eval_fraction) != split:
            continue
        ranges = pieces(len(row["input_ids"]), max_length, overflow)
        for k, (start, end) in enumerate(ranges):
            out.append({"id": piece_id(row["id"], k, len(ranges), overflow),
                        "input_ids": row["input_ids"][start:end], "loss_mask": row["loss_mask"][start:end]})
    return pa.Table.from_pylist(out, schema=INPUT_SCHEMA)


def plan(ids: list[str], num_tokens: list[int], eval_fraction: float, max_length: int,
         overflow: str) -> dict[str, Any]:
    """What ``select_rows`` will produce over the whole data artifact, counted from lengths only:
    counts (in, out, per split, truncated, split, pieces from split rows, dropped) and tokens."""
    counts: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for row_id, n in zip(ids, num_tokens, strict=True):
        split = split_of(row_id, eval_fraction)
        ranges = pieces(n, max_length, overflow)
        kept = sum(end - start for start, end in ranges)
        counts["in"] += 1
        counts[split] += len(ranges)
        counts["truncated"] += n > max_length and overflow == "truncate"
        counts["split"] += n > max_length and overflow == "split"
        counts["split_pieces"] += len(ranges) if n > max_length and overflow == "split" else 0
        counts["dropped"] += not ranges
        tokens["in"] += n
        tokens[split] += kept
        tokens["removed"] += n - kept
    counts["out"] = counts["train"] + counts["eval"]
    tokens["out"] = tokens["train"] + tokens["eval"]
    keys = ("in", "out", "train", "eval", "truncated", "split", "split_pieces", "dropped")
    return {"counts": {k: int(counts[k]) for k in keys},
            "tokens": {k: int(tokens[k]) for k in ("in", "out", "train", "eval", "removed")}}
