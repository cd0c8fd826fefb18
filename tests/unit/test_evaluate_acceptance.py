"""Offline acceptance: batched chains vs one-anchor-at-a-time inference, the verification walk,
n-gram lookup, and the statistics/report plumbing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.draft.vocab import build_vocab_mapping
from eyas.evaluate.acceptance import (
    argmax_reference,
    chain_drafts,
    ngram_proposer,
    reply_spans,
    target_argmax,
    walk_acceptance,
)
from eyas.evaluate.report import format_table, summarize
from eyas.evaluate.scorer import empty_stats, merge_stats, score_batch

VOCAB, DRAFT_VOCAB, H = 48, 32, 16


def make_draft(seed: int = 0) -> Eagle3Draft:
    config = DraftConfig(hidden_size=H, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=4, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                         max_position_embeddings=64, vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB,
                         target_hidden_size=H, aux_layer_ids=[0, 1, 2], torch_dtype="float32")
    torch.manual_seed(seed)
    draft = Eagle3Draft(config)
    draft.reset_parameters(std=0.3)  # large weights: attention and positions change the argmax
    draft.set_vocab_mapping(*build_vocab_mapping(torch.randint(0, 50, (VOCAB,)), DRAFT_VOCAB))
    return draft.eval()


def make_batch(b: int = 2, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[-1, -3:] = 0  # right padding
    loss_mask = attention.clone()
    loss_mask[:, :3] = 0
    return {"aux": torch.randn(b, t, 3 * H, generator=g), "hidden": torch.randn(b, t, H, generator=g),
            "input_ids": torch.randint(0, VOCAB, (b, t), generator=g), "loss_mask": loss_mask,
            "attention_mask": attention}


EMBED = torch.randn(VOCAB, H, generator=torch.Generator().manual_seed(5))
LM_HEAD = torch.randn(VOCAB, H, generator=torch.Generator().manual_seed(6))


@torch.no_grad()
def naive_chain(draft: Eagle3Draft, aux, ids, t: int, depth: int) -> list[int]:
    """Inference as a server does it: extend the draft's KV cache over positions 0..t with the
    target's features and tokens 1..t+1, then decode ``depth`` tokens feeding back its own output."""
    pos = torch.arange(t + 1)[None]
    out, kv = draft(F.embedding(ids[None, 1:t + 2], EMBED), draft.fuse(aux[None, :t + 1]), pos)
    hidden = out[:, -1:]
    guesses = []
    for j in range(depth):
        token = draft.draft_to_target(draft.logits(hidden).argmax(-1))  # (1, 1)
        guesses.append(int(token))
        if j + 1 < depth:
            hidden, kv = draft(F.embedding(token, EMBED), hidden, torch.tensor([[t + 1 + j]]), None, kv)
    return guesses


def test_chain_drafts_match_kv_cache_inference_at_every_anchor():
    draft, batch, depth = make_draft(), make_batch(), 4
    chains = chain_drafts(draft, EMBED, batch["aux"], batch["input_ids"], batch["attention_mask"], depth)
    assert chains.shape == (2, 10, depth) and chains.dtype == torch.int64
    for b in range(2):
        length = int(batch["attention_mask"][b].sum())
        for t in range(length - 1):
            assert chains[b, t].tolist() == naive_chain(draft, batch["aux"][b], batch["input_ids"][b], t, depth), (b, t)
    assert bool(draft.t2d[chains].all())  # every guess is a draft-vocab token mapped to a target id


def test_reply_spans_and_argmax_reference():
    assert reply_spans(torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])) == [(1, 2), (5, 5), (7, 7)]
    assert reply_spans(torch.tensor([0, 0])) == []
    hidden = torch.randn(5, H)
    arg = target_argmax(hidden, LM_HEAD, chunk=2)
    assert torch.equal(arg, (hidden @ LM_HEAD.T).argmax(-1))
    ids = torch.tensor([7, 1, 2, 3, 4])
    assert argmax_reference(ids, arg).tolist() == [7, *arg[:-1].tolist()]


def test_walk_with_an_oracle_and_a_useless_drafter():
    ref = torch.arange(100, 120)
    span = (3, 19)  # 17 reply tokens: the first from prefill, 16 in rounds
    for depth in (1, 3, 7):
        oracle = walk_acceptance([lambda t, d=depth: ref[t + 2:t + 2 + d].tolist()], ref, span, depth)
        assert oracle.tokens == 16 and oracle.rounds == math.ceil(16 / (depth + 1))
        assert oracle.accepted[0] == oracle.rounds  # every round accepts its first guess
        useless = walk_acceptance([lambda t, d=depth: [-1] * d], ref, span, depth)
        assert (useless.tokens, useless.rounds) == (16, 16)
        assert useless.reached[0] == 16 and sum(useless.accepted) == 0 and sum(useless.reached[1:]) == 0


def test_walk_accepts_the_matching_prefix_and_adds_the_bonus():
    ref = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    # from anchor t the drafter is right about t+2 and wrong about t+3
    stats = walk_acceptance([lambda t: [t + 2, -1, t + 4]], ref, (1, 9), depth=3)
    # rounds: p=1 -> accept 1 + bonus -> p=3 -> p=5 -> p=7 -> p=9: 4 rounds, 8 tokens
    assert (stats.rounds, stats.tokens) == (4, 8)
    assert stats.reached == [4, 4, 0] and stats.accepted == [4, 0, 0]


def test_walk_with_two_drafters_keeps_the_longer_accepted_chain_each_round():
    ref = torch.arange(20)
    even = lambda t: [t + 2, t + 3, -1] if t % 2 == 0 else [-1]  # noqa: E731 - right from even anchors
    odd = lambda t: [t + 2, t + 3, -1] if t % 2 else []  # noqa: E731 - right from odd anchors
    alone = walk_acceptance([even], ref, (1, 19), depth=3)
    # 3 tokens from an even anchor move to an odd one (1 token), and back: 3,1,3,1,... then 2
    assert (alone.tokens, alone.rounds) == (18, 9)
    both = walk_acceptance([even, odd], ref, (1, 19), depth=3)
    assert (both.tokens, both.rounds) == (18, 6)  # every round accepts 2 + bonus
    assert both.accepted == [6, 6, 0] and both.reached == [6, 6, 6]


def test_ngram_proposer_uses_the_latest_earlier_match_within_the_context():
    seq = torch.tensor([5, 1, 2, 3, 9, 8, 1, 2, 3, 4, 4])
    propose = ngram_proposer(seq, depth=3, n_min=1, n_max=3)
    assert propose(7) == [9, 8, 1]  # context ..1,2,3 (t+1 = 8) matches positions 1..3
    assert propose(2) == []  # context 5,1,2,3 has no earlier 3/2/1-gram repeat
    assert propose(9) == [4]  # context ends 4,4: the 1-gram 4 at position 9, capped at the context
    assert ngram_proposer(seq, depth=5, n_min=2, n_max=2)(7) == [9, 8, 1, 2, 3]


def test_score_batch_statistics_are_consistent_and_reportable():
    draft, batch, depth = make_draft(), make_batch(b=3, t=12), 3
    stats = score_batch(draft, EMBED, LM_HEAD, batch, depth, 1, 2)
    assert stats["rows"] == 3 and stats["reply_tokens"] == int(batch["loss_mask"].sum())
    expected_tokens = sum(e - max(s, 1) for i in range(3)
                          for s, e in reply_spans(batch["loss_mask"][i, :int(batch["attention_mask"][i].sum())]))
    for ref in ("data", "target_argmax"):
        for name in ("head", "ngram"):
            for d in range(1, depth + 1):
                walk = stats["walks"][ref][name][str(d)]
                assert walk["tokens"] == expected_tokens and 0 < walk["rounds"] <= expected_tokens
    merged = merge_stats(merge_stats(empty_stats(depth), stats), json.loads(json.dumps(stats)))
    assert merged["rows"] == 6 and merged["ttt_counts"] == [2 * c for c in stats["ttt_counts"]]
    report = summarize(merged, depth)
    tau = report["references"]["data"]["head"]["tau"]
    assert set(tau) == {"1", "2", "3"} and all(v >= 1.0 for v in tau.values())
    assert len(report["references"]["data"]["ngram"]["accept_rate"]) == depth
    assert "tau head" in format_table(report)


def test_merge_stats_rejects_different_depths():
    with pytest.raises((KeyError, ValueError)):
        merge_stats(empty_stats(2), empty_stats(3))
