"""Scoring feature batches: the head's chains, n-gram lookup and (when the draft directory has
one) the corpus n-gram store, against two references.

References: ``data`` = the stored tokens (the target's own greedy replies when the data stage
regenerated them at temperature 0); ``target_argmax`` = argmax of the stored final hidden state
through the target's lm_head (what verification would emit given the data prefix).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from eyas import storage
from eyas.draft.model import Eagle3Draft
from eyas.draft.ttt import ttt_forward
from eyas.engine.ngram_store import STORE_FILE, NgramStore
from eyas.evaluate.acceptance import (
    Proposer,
    WalkStats,
    argmax_reference,
    chain_drafts,
    ngram_proposer,
    reply_spans,
    target_argmax,
    tensor_proposer,
    walk_acceptance,
)

DRAFTERS = ("head", "ngram", "head+ngram")  # head+ngram: both chains verified together
CORPUS_DRAFTERS = ("corpus", "head+ngram+corpus")  # with the draft's ngram_store.npz
REFERENCES = ("data", "target_argmax")


def drafters(with_store: bool) -> tuple[str, ...]:
    return DRAFTERS + CORPUS_DRAFTERS if with_store else DRAFTERS


def draft_store(draft_dir: str) -> NgramStore | None:
    """The draft directory's corpus n-gram store, or None when it has none."""
    uri = storage.join(draft_dir, STORE_FILE)
    return NgramStore.load(uri) if storage.exists(uri) else None


def store_proposer(store: NgramStore, tokens: Tensor, depth: int) -> Proposer:
    """The corpus store as a proposer: from anchor t, the context is ``tokens[0 .. t+1]``."""
    seq = tokens.tolist()
    return lambda t: store.propose(seq[max(0, t + 2 - store.max_n):t + 2], depth)


def empty_stats(depth: int, names: tuple[str, ...] = DRAFTERS) -> dict[str, Any]:
    """The additive statistics of a set of rows (``merge_stats`` sums them)."""
    walks = {ref: {name: {str(d): asdict(WalkStats(reached=[0] * d, accepted=[0] * d))
                          for d in range(1, depth + 1)} for name in names} for ref in REFERENCES}
    return {"rows": 0, "reply_tokens": 0, "argmax_agree": 0, "argmax_total": 0,
            "ttt_hits": [0.0] * depth, "ttt_counts": [0] * depth, "walks": walks}


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two statistics dicts of the same depth (numbers add, lists add elementwise)."""
    if isinstance(a, dict):
        return {key: merge_stats(a[key], b[key]) for key in a}
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


def _walk_row(stats: dict[str, Any], proposers: dict[str, Any], ref_name: str, reference: Tensor,
              spans: list[tuple[int, int]], depth: int) -> None:
    for name, propose in proposers.items():
        for d in range(1, depth + 1):
            total = WalkStats(**stats["walks"][ref_name][name][str(d)])
            for span in spans:
                total.add(walk_acceptance(propose, reference, span, d))
            stats["walks"][ref_name][name][str(d)] = asdict(total)


@torch.no_grad()
def score_batch(draft: Eagle3Draft, embed_weight: Tensor, lm_head_weight: Tensor, batch: dict[str, Tensor],
                depth: int, ngram_min: int = 1, ngram_max: int = 3,
                store: NgramStore | None = None) -> dict[str, Any]:
    """Statistics of one collated batch (``eyas.features.schema.collate`` keys, right padded)."""
    stats = empty_stats(depth, drafters(store is not None))
    ids, mask, attn = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    # Step 1: teacher-forced TTT accuracy per step (the training metric, on held-out data).
    ttt = ttt_forward(draft, embed_weight, lm_head_weight, batch["aux"], batch["hidden"], ids, mask,
                      attn, ttt_length=depth)
    stats["ttt_hits"] = [float(a) * int(c) for a, c in zip(ttt.step_acc, ttt.step_counts, strict=True)]
    stats["ttt_counts"] = [int(c) for c in ttt.step_counts]
    # Step 2: the head's free-running chains from every anchor, in one batched pass.
    chains = chain_drafts(draft, embed_weight, batch["aux"], ids, attn, depth)  # (B, T, depth)
    # Step 3: per row, walk the replies with both drafters against both references.
    for i in range(ids.shape[0]):
        n = int(attn[i].sum())
        row_ids, row_mask = ids[i, :n], mask[i, :n]
        spans = reply_spans(row_mask)
        argmax_ref = argmax_reference(row_ids, target_argmax(batch["hidden"][i, :n], lm_head_weight))
        counted = row_mask.bool().clone()
        counted[0] = False
        stats["rows"] += 1
        stats["reply_tokens"] += int(row_mask.sum())
        stats["argmax_agree"] += int((argmax_ref == row_ids)[counted].sum())
        stats["argmax_total"] += int(counted.sum())
        head = tensor_proposer(chains[i, :n])
        ngram = ngram_proposer(row_ids, depth, ngram_min, ngram_max)
        proposers = {"head": [head], "ngram": [ngram], "head+ngram": [head, ngram]}
        if store is not None:
            corpus = store_proposer(store, row_ids, depth)
            proposers |= {"corpus": [corpus], "head+ngram+corpus": [head, ngram, corpus]}
        _walk_row(stats, proposers, "data", row_ids, spans, depth)
        _walk_row(stats, proposers, "target_argmax", argmax_ref, spans, depth)
    return stats


class AcceptanceScorer:
    """Ray Data callable class: loads the draft and the target's embedding + lm_head once, then
    turns each batch of feature rows into one row ``{"stats": json}`` of summed statistics."""

    def __init__(self, draft_uri: str, target_dir: str, depth: int, ngram_min: int, ngram_max: int,
                 max_length: int, use_gpu: bool = False, torch_threads: int = 1) -> None:
        from eyas.draft.target import load_target_head
        from eyas.train.export import download_dir

        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        local = download_dir(draft_uri, tempfile.mkdtemp(prefix="eyas-eval-draft-"))
        self.draft = Eagle3Draft.from_pretrained(local, dtype=torch.float32).to(self.device).eval()
        self.store = draft_store(str(local))
        embed, lm_head, _ = load_target_head(target_dir)
        self.embed = embed.float().to(self.device)
        self.lm_head = lm_head.float().to(self.device)
        self.depth, self.ngram, self.max_length = depth, (ngram_min, ngram_max), max_length

    def __call__(self, table: Any) -> dict[str, list[str]]:
        from eyas.train.data import table_to_batch

        batch = {k: v.to(self.device) for k, v in table_to_batch(table, self.max_length).items()}
        stats = score_batch(self.draft, self.embed, self.lm_head, batch, self.depth, *self.ngram,
                            store=self.store)
        return {"stats": [json.dumps(stats)]}
