"""Accepting a verified draft tree: greedy, and lossless sampling for deterministic trees.

Both functions are pure tensor functions over a batch of trees (node 0 = root, parents
precede children, ``parents[:, 0] == -1``) and return the same triple:
- path (B, D) int64: accepted tree nodes, root first; entries past ``num_kept`` repeat the
  last accepted node;
- num_kept (B,) int64: accepted nodes including the root (accepted draft tokens + 1);
- bonus (B,) int64: the token the target emits after the last accepted node.
Tokens emitted this round = ``tokens[path[:num_kept]][1:] + [bonus]``; the bonus is the next
round's root.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eyas.engine.sampling import sample_from_probs
from eyas.engine.tree import tree_depths


def accept_greedy(tokens: Tensor, parents: Tensor, target_argmax: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Walk from the root while some child's token equals the target's argmax at the node.

    tokens, parents, target_argmax: (B, D) int64 (argmax of the target logits at each node).
    """
    B, D = tokens.shape
    rows = torch.arange(B, device=tokens.device)
    cur = torch.zeros(B, dtype=torch.long, device=tokens.device)
    path = [cur]
    for _ in range(D - 1):
        match = (parents == cur[:, None]) & (tokens == target_argmax[rows, cur][:, None])
        cur = torch.where(match.any(1), match.int().argmax(1), cur)  # first matching child
        path.append(cur)
    path_t = torch.stack(path, dim=1)  # (B, D)
    num_kept = 1 + (path_t[:, 1:] != path_t[:, :-1]).sum(1)
    return path_t, num_kept, target_argmax[rows, cur]


def accept_sampled(tokens: Tensor, parents: Tensor, probs: Tensor, uniforms: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless acceptance for a tree whose candidates do not depend on the target's draws.

    Every node draws the target's token from its distribution p by inverse CDF with the
    uniform of its depth (all nodes of a depth are candidates for the same output position),
    then the greedy walk follows the drawn tokens. The emitted tokens are therefore exactly the
    tokens plain sampling draws with the same uniforms, one per output position: the output
    follows the target whatever tree (or plain round) produced it. Per node this is the
    sequential rule (accept the first drafted child x with probability p(x), the next with its
    share of what is left, else draw from p without them) coupled through one uniform: the
    child x is accepted with probability p(x) and the bonus follows p with the drafted
    children removed.

    tokens, parents (B, D) int64; probs (B, D, V) float target distribution at each node
    (one-hot rows reproduce greedy decoding); uniforms (B, U) in [0, 1), U > the deepest
    node's depth: column j draws at depth j (output position: the root's + j).
    """
    B, D, V = probs.shape
    u = uniforms.gather(1, tree_depths(parents))  # (B, D)
    drawn = sample_from_probs(probs.reshape(B * D, V), u.reshape(B * D)).view(B, D)
    return accept_greedy(tokens, parents, drawn)


def accepted_counts(path: Tensor, kept: Tensor, tree_tokens: int) -> tuple[Tensor, Tensor]:
    """Draft tokens each request accepted from the EAGLE-3 tree (nodes < ``tree_tokens``: the
    lookup and corpus branches come after them), and in all; both (B,) int64.

    path (B, D), kept (B,) int64 as ``accept_greedy`` returns them.
    """
    D = path.shape[1]
    on_path = torch.arange(1, D, device=path.device)[None] < kept[:, None]  # (B, D-1)
    return (on_path & (path[:, 1:] < tree_tokens)).sum(1), kept - 1
