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

    At the current node with target distribution p, visit its children in node order:
    accept child x with probability p'(x) / sum(p'), where p' is p with the already
    rejected siblings zeroed; on acceptance move to x. When every child is rejected (or the
    node is a leaf) the bonus is drawn from p' (all drafted siblings removed). This is
    sequential sampling from p, so the emitted tokens follow the target exactly.

    tokens, parents (B, D) int64; probs (B, D, V) float target distribution at each node
    (one-hot rows reproduce greedy decoding); uniforms (B, D + 1) in [0, 1): column c decides
    node c's acceptance, column D draws the bonus.
    """
    B, D = tokens.shape
    rows = torch.arange(B, device=tokens.device)
    cur = torch.zeros(B, dtype=torch.long, device=tokens.device)
    active = torch.ones(B, dtype=torch.bool, device=tokens.device)
    residual = probs[:, 0].clone()  # (B, V) p' at the current node
    path = [cur]
    for _ in range(D - 1):
        moved = torch.zeros_like(active)
        for c in range(1, D):
            tok = tokens[:, c : c + 1]  # (B, 1)
            trial = active & ~moved & (parents[:, c] == cur)
            p_tok = residual.gather(1, tok).squeeze(1)
            accept = trial & (uniforms[:, c] * residual.sum(1) < p_tok)
            reject = trial & ~accept
            residual.scatter_(1, tok, torch.where(reject, 0.0, p_tok)[:, None])
            cur = torch.where(accept, c, cur)
            moved |= accept
        residual = torch.where(moved[:, None], probs[rows, cur], residual)
        active &= moved
        path.append(cur)
    path_t = torch.stack(path, dim=1)  # (B, D)
    num_kept = 1 + (path_t[:, 1:] != path_t[:, :-1]).sum(1)
    return path_t, num_kept, sample_from_probs(residual, uniforms[:, D])
