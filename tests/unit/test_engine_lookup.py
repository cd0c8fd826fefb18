"""N-gram lookup drafting and its merge into draft trees (``eyas.engine.lookup``)."""

from __future__ import annotations

import torch

from eyas.engine.accept import accept_greedy
from eyas.engine.lookup import PAD_PARENT, add_chains, chain_nodes, ngram_lookup
from eyas.engine.tree import tree_attention_mask, tree_depths


def test_lookup_follows_the_latest_earlier_occurrence_of_the_longest_suffix():
    seq = [5, 1, 2, 3, 9, 8, 7, 2, 3, 6, 1, 2, 3]
    assert ngram_lookup(seq, 3) == [9, 8, 7]  # the 3-gram 1,2,3 at 1 beats the later 2-gram 2,3 at 7
    assert ngram_lookup(seq, 3, n_min=1, n_max=2) == [6, 1, 2]  # 2-gram 2,3: latest at 7
    assert ngram_lookup(seq, 10) == [9, 8, 7, 2, 3, 6, 1, 2, 3]  # cut at the end of the context
    assert ngram_lookup([4, 5, 6], 3) == []  # nothing repeats
    assert ngram_lookup([4, 4], 3) == [4]  # the continuation may be the last token itself
    assert ngram_lookup([7], 3) == []


def test_chain_nodes_reuse_the_prefix_already_in_the_tree():
    tokens, parents = [10, 11, 12, 13], [-1, 0, 1, 0]  # root 10; 11 -> 12; 13
    assert chain_nodes(tokens, parents, [11, 20, 21]) == [(20, 1), (21, 4)]
    assert chain_nodes(tokens, parents, [11, 12]) == []  # already a path of the tree
    assert chain_nodes(tokens, parents, [30]) == [(30, 0)]
    assert chain_nodes(tokens, parents, []) == []


def test_add_chains_pads_rows_and_padding_is_never_accepted():
    tokens = torch.tensor([[10, 11], [10, 11]])
    parents = torch.tensor([[-1, 0], [-1, 0]])
    new_tokens, new_parents = add_chains(tokens, parents, [[11, 20, 21], []])
    assert new_tokens.tolist() == [[10, 11, 20, 21], [10, 11, 0, 0]]
    assert new_parents.tolist() == [[-1, 0, 1, 2], [-1, 0, PAD_PARENT, PAD_PARENT]]
    assert tree_depths(new_parents).tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    assert tree_attention_mask(new_parents)[1, 2].tolist() == [True, False, True, False]
    # the target's argmax is token 0 everywhere: only real children may match it
    argmax = torch.tensor([[11, 20, 21, 5], [0, 0, 0, 0]])
    path, kept, bonus = accept_greedy(new_tokens, new_parents, argmax)
    assert kept.tolist() == [4, 1] and path[0].tolist() == [0, 1, 2, 3]
    assert bonus.tolist() == [5, 0]
    same = add_chains(tokens, parents, [[], [11]])  # nothing new anywhere: unchanged
    assert same[0] is tokens and same[1] is parents
