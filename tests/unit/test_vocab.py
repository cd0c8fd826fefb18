"""Draft vocabulary: assistant-token counts, frequency mapping, identity mapping, reuse."""

from __future__ import annotations

import pytest
import torch

from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.draft.vocab import (
    build_vocab_mapping,
    check_vocab_mapping,
    count_tokens,
    load_vocab_mapping,
)
from eyas.export.writer import save_draft


def test_count_tokens_counts_assistant_tokens_only():
    ids = [torch.tensor([[1, 2, 3, 3], [4, 4, 4, 0]]), torch.tensor([5, 5, 1])]
    masks = [torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]]), torch.tensor([1, 0, 1])]
    counts = count_tokens(ids, masks, vocab_size=8)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [0, 1, 0, 2, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="vocab_size"):
        count_tokens([torch.tensor([9])], [torch.tensor([1])], vocab_size=8)
    with pytest.raises(ValueError, match="shape"):
        count_tokens([torch.tensor([1, 2])], [torch.tensor([1])], vocab_size=8)


def test_identity_mapping_when_vocab_is_small():
    d2t, t2d = build_vocab_mapping(torch.randint(0, 9, (512,)), draft_vocab_size=32000)
    assert d2t.shape == (512,) and d2t.dtype == torch.int64 and not d2t.any()
    assert t2d.shape == (512,) and t2d.dtype == torch.bool and t2d.all()
    assert check_vocab_mapping(d2t, t2d) == []


def test_frequency_mapping_offsets_and_ties():
    counts = torch.tensor([5, 0, 9, 3, 3, 7, 0, 3])
    d2t, t2d = build_vocab_mapping(counts, draft_vocab_size=4)
    # Most frequent: 2 (9), 5 (7), 0 (5), then a tie of 3/4/7 (3) -> lowest id 3 wins.
    used = (torch.arange(4) + d2t).tolist()
    assert used == [0, 2, 3, 5]  # ascending target ids
    assert d2t.tolist() == [0, 1, 1, 2]
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert check_vocab_mapping(d2t, t2d) == []
    again = build_vocab_mapping(counts.clone(), draft_vocab_size=4)
    assert torch.equal(again[0], d2t) and torch.equal(again[1], t2d)


def test_check_vocab_mapping_finds_inconsistency():
    d2t, t2d = build_vocab_mapping(torch.tensor([5, 0, 9, 3, 3, 7, 0, 3]), 4)
    bad = d2t.clone()
    bad[1] = 2  # draft 1 -> target 3 while t2d says the second kept id is 2
    assert any("draft id 1" in p for p in check_vocab_mapping(bad, t2d))
    assert any("True entries" in p for p in check_vocab_mapping(d2t, torch.ones(8, dtype=torch.bool)))
    assert any("dtype" in p for p in check_vocab_mapping(d2t.int(), t2d))


def test_load_vocab_mapping_reuses_checkpoint(tmp_path):
    config = DraftConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-6,
                         rope_parameters={"rope_theta": 1e4}, max_position_embeddings=32,
                         vocab_size=8, draft_vocab_size=4, target_hidden_size=8,
                         aux_layer_ids=[0, 1, 2], torch_dtype="float32")
    draft = Eagle3Draft(config)
    d2t, t2d = build_vocab_mapping(torch.tensor([5, 0, 9, 3, 3, 7, 0, 3]), 4)
    draft.set_vocab_mapping(d2t, t2d)
    save_draft(draft, tmp_path / "draft", dtype="float32")
    got_d2t, got_t2d = load_vocab_mapping(tmp_path / "draft")
    assert torch.equal(got_d2t, d2t) and torch.equal(got_t2d, t2d)
    with pytest.raises(FileNotFoundError, match="not an exported draft"):
        load_vocab_mapping(tmp_path / "missing")
