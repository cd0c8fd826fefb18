"""EAGLE-3 draft trees: the draft extend, top-K tree growth, candidate selection, tree masks.

Positions, for a request whose target cache holds P committed tokens and whose root (the
token the target produced last) sits at position P:
- the draft cache holds P entries; entry t pairs the target features at t with token t+1, so
  its last entry (features at P-1, the root) yields the depth-1 candidates (position P+1);
- a depth-d node is fed to the draft at draft position P+d-1 (its token plus the output that
  proposed it) and proposes depth-(d+1) children; in the target tree it sits at P+d.
Tree nodes are ordered root first, then by generation order, so every parent precedes its
children; ``parents[:, 0] == -1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from eyas.engine.kv_cache import KVCache, cache_attention_mask


class DraftHead(Protocol):
    """What tree drafting needs of ``eyas.draft.model.Eagle3Draft``."""

    def fuse(self, aux: Tensor) -> Tensor: ...
    def __call__(self, input_embeds: Tensor, hidden: Tensor, position_ids: Tensor,
                 attn_bias: Tensor | None = None, past_kv: tuple[Tensor, Tensor] | None = None
                 ) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...
    def logits(self, out: Tensor) -> Tensor: ...
    def draft_to_target(self, draft_ids: Tensor) -> Tensor: ...


Embed = Callable[[Tensor], Tensor]  # token ids (B, T) -> target embeddings (B, T, H)


@dataclass
class DraftTree:
    """A batch of draft trees of D nodes each; node 0 is the root."""

    tokens: Tensor  # (B, D) int64 target-vocab token ids
    parents: Tensor  # (B, D) int64 parent node index, -1 for the root, -2 for padding (never accepted)


def validate_tree_knobs(num_steps: int, topk: int, num_draft_tokens: int) -> None:
    """Check SGLang's S / K / D: D-1 must not exceed the K + (S-1)*K*K candidates drafted."""
    if num_steps < 1 or topk < 1 or num_draft_tokens < 2:
        raise ValueError(f"num_steps={num_steps}, eagle_topk={topk}, num_draft_tokens="
                         f"{num_draft_tokens}: need S >= 1, K >= 1, D >= 2")
    candidates = topk + (num_steps - 1) * topk * topk
    if num_draft_tokens - 1 > candidates:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} exceeds the {candidates} + 1 "
                         f"nodes that num_steps={num_steps}, eagle_topk={topk} draft; lower it "
                         f"(with eagle_topk=1 use num_draft_tokens = num_steps + 1)")


def tree_attention_mask(parents: Tensor) -> Tensor:
    """parents (B, D) int64 (-1 = root, parents precede children) -> (B, D, D) bool:
    ``mask[b, i, j]`` is True iff node j is node i or one of its ancestors."""
    B, D = parents.shape
    eye = torch.eye(D, dtype=torch.bool, device=parents.device).expand(B, D, D)
    mask = eye.clone()
    for i in range(1, D):
        parent_rows = mask[torch.arange(B), parents[:, i].clamp(min=0)]  # (B, D)
        mask[:, i] = eye[:, i] | parent_rows
    return mask


def tree_depths(parents: Tensor) -> Tensor:
    """parents (B, D) int64 -> depth of each node (B, D) int64 (the root has depth 0)."""
    return tree_attention_mask(parents).sum(-1) - 1


def select_tree(root: Tensor, cand_tokens: Tensor, cand_parents: Tensor, cand_scores: Tensor,
                num_draft_tokens: int) -> DraftTree:
    """Keep the D-1 best-scoring candidates plus the root.

    root (B,) int64; cand_tokens / cand_parents / cand_scores (B, N) in generation order,
    cand_parents indexing candidates (-1 = root). A stable sort ranks a parent before a child
    with an equal score, so ancestors of selected nodes are always selected.
    """
    B = root.shape[0]
    order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices
    chosen = order[:, : num_draft_tokens - 1].sort(dim=1).values  # (B, D-1) generation order
    node_of = torch.full_like(cand_tokens, -1)  # candidate index -> tree node index
    node_of.scatter_(1, chosen, torch.arange(1, num_draft_tokens, device=root.device).expand(B, -1))
    cand_par = cand_parents.gather(1, chosen)  # (B, D-1)
    par = torch.where(cand_par < 0, 0, node_of.gather(1, cand_par.clamp(min=0)))
    if (par < 0).any():
        raise RuntimeError("draft tree selection dropped an ancestor of a selected node")
    tokens = torch.cat([root[:, None], cand_tokens.gather(1, chosen)], dim=1)
    root_parent = torch.full((B, 1), -1, dtype=torch.long, device=root.device)
    return DraftTree(tokens=tokens, parents=torch.cat([root_parent, par], dim=1))


def draft_extend(draft: DraftHead, embed: Embed, cache: KVCache, slots: Tensor, ids: Tensor,
                 aux: Tensor, counts: Tensor) -> Tensor:
    """Run the draft over each request's newly committed tokens and append them to its cache.

    ids (B, T) int64 tokens t+1 (padded past ``counts``); aux (B, T, 3Ht) target aux hidden
    states at t; counts (B,) int64 >= 1 valid entries per row. Returns the draft output at
    each row's last valid entry (B, H), from which the depth-1 candidates are drafted.
    """
    B, T = ids.shape
    prefix = cache.lengths[slots]  # (B,)
    past_len = int(prefix.max())
    past = cache.gather(0, slots, past_len)
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()[None]
    mask = cache_attention_mask(prefix, causal, past_len + T)  # (B, T, S)
    positions = prefix[:, None] + torch.arange(T, device=ids.device)  # (B, T)
    out, (k, v) = draft(embed(ids), draft.fuse(aux), positions, _bias(mask, aux.dtype), past)
    cache_new_positions(cache, slots, positions, k, v, counts, past_len)
    return out[torch.arange(B), counts - 1]  # (B, H)


def cache_new_positions(cache: KVCache, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor,
                        counts: Tensor, past_len: int) -> None:
    """Write the draft's new (k, v) entries (each (B, n_kv, past_len + T, hd), the gathered
    past first) of the ``counts`` (B,) valid tokens at ``positions`` (B, T) and advance the
    slots' lengths by counts."""
    k_new = k[:, :, past_len:].transpose(1, 2)  # (B, T, nkv, hd)
    v_new = v[:, :, past_len:].transpose(1, 2)
    valid = torch.arange(k_new.shape[1], device=k.device)[None] < counts[:, None]  # (B, T)
    cache.write(0, slots, positions, k_new, v_new, valid)
    cache.lengths[slots] += counts


def grow_tree(draft: DraftHead, embed: Embed, cache: KVCache, slots: Tensor, last_out: Tensor,
              root: Tensor, num_steps: int, topk: int, num_draft_tokens: int) -> DraftTree:
    """Draft a tree of D nodes per request (EAGLE-2/3 dynamic tree).

    last_out (B, H) the extend's output at the root's entry; root (B,) int64 root tokens.
    The draft's tree entries live only in this function (a scratch past_kv); the draft cache
    is read, never written, so nothing needs compacting there after verification.
    """
    B, K = root.shape[0], topk
    dev = root.device
    prefix = cache.lengths[slots]  # (B,) draft entries; the root's position is prefix
    past_len = int(prefix.max())
    past = cache.gather(0, slots, past_len)
    prefix_vis = torch.arange(past_len, device=dev)[None] < prefix[:, None]  # (B, past_len)
    # Step 1: depth-1 candidates from the extend's last output.
    logp = draft.logits(last_out[:, None]).log_softmax(-1)[:, 0]  # (B, Vd)
    scores, ids = logp.topk(K, dim=-1)  # (B, K)
    f_tokens = draft.draft_to_target(ids)
    f_hidden = last_out[:, None].expand(B, K, last_out.shape[-1])  # (B, K, H)
    f_cand = torch.arange(K, device=dev).expand(B, K)  # candidate index of each frontier node
    f_vis = torch.zeros(B, K, 0, dtype=torch.bool, device=dev)  # ancestors among scratch
    c_tokens, c_parents, c_scores = [f_tokens], [torch.full_like(f_tokens, -1)], [scores]
    n_cand = K
    for step in range(1, num_steps):
        # Step 2: one draft pass over the K frontier nodes at draft position P + step - 1.
        self_vis = torch.eye(K, dtype=torch.bool, device=dev).expand(B, K, K)
        vis = torch.cat([prefix_vis[:, None].expand(B, K, past_len), f_vis, self_vis], dim=-1)
        positions = (prefix + step - 1)[:, None].expand(B, K)
        out, past = draft(embed(f_tokens), f_hidden, positions, _bias(vis, last_out.dtype), past)
        # Step 3: K children per node; path score = parent score + child log-prob.
        child_logp, child_ids = draft.logits(out).log_softmax(-1).topk(K, dim=-1)  # (B, K, K)
        child_scores = (scores[:, :, None] + child_logp).flatten(1)  # (B, K*K)
        child_tokens = draft.draft_to_target(child_ids).flatten(1)
        c_tokens.append(child_tokens)
        c_parents.append(f_cand[:, :, None].expand(B, K, K).flatten(1))
        c_scores.append(child_scores)
        # Step 4: the K best children become the next frontier.
        scores, best = child_scores.topk(K, dim=-1)  # (B, K)
        parent = best // K  # frontier node each child came from
        f_tokens = child_tokens.gather(1, best)
        f_hidden = out.gather(1, parent[..., None].expand(-1, -1, out.shape[-1]))
        f_vis = torch.cat([f_vis, self_vis], dim=-1).gather(
            1, parent[..., None].expand(-1, -1, f_vis.shape[-1] + K))
        f_cand = n_cand + best
        n_cand += K * K
    return select_tree(root, torch.cat(c_tokens, 1), torch.cat(c_parents, 1),
                       torch.cat(c_scores, 1), num_draft_tokens)


def _bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool mask (B, T, S) -> additive (B, 1, T, S) float bias, 0 where True, -inf elsewhere."""
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, float("-inf"))[:, None]
