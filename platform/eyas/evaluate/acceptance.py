"""Offline acceptance: how many tokens per target verification a drafter would give, greedy.

Pure functions of tensors (no Ray, no I/O). Alignment, as in ``eyas.draft.ttt``: when the target
has produced tokens ``x_0 .. x_p`` it has features (aux hidden states) for positions ``0 .. p-1``.
The draft's chain from anchor ``t = p - 1`` pairs features at ``t`` with token ``x_{t+1}`` and
then feeds itself: depth ``j`` (0-based) is its guess for position ``t + 2 + j``. The target
verifies the chain: the leading guesses equal to the reference tokens are accepted, and the target
adds one token of its own (the bonus). The next round starts at the new last position, with the
target's features for everything accepted (the draft's step-0 keys always come from the target).

tau (expected acceptance length) = tokens produced / verification rounds; plain decoding has 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from eyas.draft.model import Eagle3Draft
from eyas.draft.ttt import (
    position_ids_from_mask,
    resolve_attention,
    shift_left,
    ttt_attention_mask,
)
from eyas.engine.lookup import ngram_lookup

Proposer = Callable[[int], list[int]]  # anchor t -> guesses for positions t+2, t+3, ...


@torch.no_grad()
def chain_drafts(draft: Eagle3Draft, embed_weight: Tensor, aux: Tensor, input_ids: Tensor,
                 attention_mask: Tensor | None, depth: int, attention: str = "auto") -> Tensor:
    """Greedy chains of ``depth`` tokens from EVERY anchor at once.

    embed_weight (V, H) the target's embeddings; aux (B, T, 3H); input_ids (B, T) int64;
    attention_mask (B, T) (1 = real) or None -> (B, T, depth) int64 target-vocab ids, where
    ``out[b, t, j]`` guesses ``input_ids[b, t + 2 + j]``. Step j attends to the step-0 keys at
    positions <= t (target features) and to the anchor's own chain keys, exactly as a draft
    model with a KV cache would at inference (checked against that in the tests). ``attention``
    picks the kernel as in ``eyas.draft.ttt.ttt_forward`` (the masks are TTT's).
    """
    b, t = input_ids.shape
    device = input_ids.device
    backend = resolve_attention(attention, device)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = position_ids_from_mask(attention_mask, b, t, device)  # (B, T)
    hidden = draft.fuse(aux)  # (B, T, H)
    tokens = shift_left(input_ids, 1)  # (B, T): x_{t+1}, the token the target produced last
    past, guesses = None, []
    for k in range(depth):
        attn = ttt_attention_mask(real, k, backend)  # over (T, T*(k+1))
        out, past = draft(F.embedding(tokens, embed_weight), hidden, positions + k, attn, past)
        tokens = draft.draft_to_target(draft.logits(out).argmax(-1))  # (B, T) the draft's own guess
        guesses.append(tokens)
        hidden = out
    return torch.stack(guesses, dim=-1)  # (B, T, depth)


@torch.no_grad()
def target_argmax(hidden: Tensor, lm_head_weight: Tensor, chunk: int = 512) -> Tensor:
    """hidden (T, H) final hidden states, lm_head_weight (V, H) -> (T,) int64 argmax token ids,
    computed ``chunk`` positions at a time (the full (T, V) logits can be large)."""
    out = [F.linear(hidden[i:i + chunk].to(lm_head_weight.dtype), lm_head_weight).argmax(-1)
           for i in range(0, hidden.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def argmax_reference(input_ids: Tensor, argmax: Tensor) -> Tensor:
    """(T,) reference tokens from the target's own argmax: position p gets argmax(hidden[p-1]);
    position 0 keeps the data token."""
    ref = input_ids.clone()
    ref[1:] = argmax[:-1]
    return ref


def reply_spans(loss_mask: Tensor) -> list[tuple[int, int]]:
    """(T,) 0/1 assistant mask -> inclusive ``(start, end)`` of each contiguous reply."""
    spans, start = [], None
    values = loss_mask.tolist()
    for i, v in enumerate(values + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i - 1))
            start = None
    return spans


@dataclass
class WalkStats:
    """Summed over rounds: ``reached[j]`` rounds whose guess j was checked (all earlier accepted),
    ``accepted[j]`` rounds where guess j was accepted."""

    rounds: int = 0
    tokens: int = 0
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, other: WalkStats) -> None:
        self.rounds += other.rounds
        self.tokens += other.tokens
        n = max(len(self.reached), len(other.reached))
        self.reached = [_at(self.reached, j) + _at(other.reached, j) for j in range(n)]
        self.accepted = [_at(self.accepted, j) + _at(other.accepted, j) for j in range(n)]


def _at(values: list[int], j: int) -> int:
    return values[j] if j < len(values) else 0


def walk_acceptance(proposers: Sequence[Proposer], reference: Tensor, span: tuple[int, int],
                    depth: int) -> WalkStats:
    """Speculative decoding of one reply ``span`` (inclusive token positions) with greedy verification.

    Each proposer ``propose(t)`` returns guesses for positions t+2, t+3, ... from anchor t (any
    length; only the first ``depth`` are used). Several proposers are verified together, as one
    tree of chains from the root: the round keeps the longest accepted prefix among them.
    ``reference`` (T,) holds the token the target emits at each position. The reply's first
    token comes from the prefill and is not a round.
    """
    ref = reference.tolist()
    stats = WalkStats(reached=[0] * depth, accepted=[0] * depth)
    start, end = span
    p = max(start, 1)  # last produced position (a reply at position 0 has no anchor before it)
    while p < end:
        remaining = end - p
        n, checked = 0, 0
        for propose in proposers:
            guesses = propose(p - 1)[:min(depth, remaining)]
            k = 0
            while k < len(guesses) and guesses[k] == ref[p + 1 + k]:
                k += 1
            if (k, len(guesses)) > (n, checked):
                n, checked = k, len(guesses)
        for j in range(min(n + 1, checked)):
            stats.reached[j] += 1
        for j in range(n):
            stats.accepted[j] += 1
        produced = n + 1 if n < remaining else n  # the bonus token exists while the reply goes on
        stats.rounds += 1
        stats.tokens += produced
        p += produced
    return stats


def ngram_proposer(tokens: Tensor, depth: int, n_min: int = 1, n_max: int = 3) -> Proposer:
    """Prompt-lookup drafting (``eyas.engine.lookup.ngram_lookup``, as the engine drafts): from
    anchor t the context is ``tokens[0 .. t+1]``; no match proposes nothing."""
    seq = tokens.numpy()
    return lambda t: ngram_lookup(seq[:t + 2], depth, n_min, n_max)


def tensor_proposer(guesses: Tensor) -> Proposer:
    """(T, depth) precomputed guesses (e.g. one row of ``chain_drafts``) as a proposer."""
    table = guesses.tolist()
    return lambda t: table[t]
