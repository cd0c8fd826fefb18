"""N-gram lookup drafting ("prompt lookup"), and merging its chain into an EAGLE-3 draft tree.

Greedy small models and copy-heavy requests (summaries, edits, RAG answers, code) repeat spans
of their context. A lookup chain costs no forward pass: find the latest earlier occurrence of
the context's last n tokens (n from ``n_max`` down to ``n_min``) and propose the tokens that
followed it. The engine adds that chain to each request's draft tree as one more branch from the
root (sharing the prefix the tree already has), so one verification checks both drafters and
keeps whichever got further. The offline evaluation uses the same lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

PAD_PARENT = -2  # parent index of a padding node: attends like a root child, never accepted


def ngram_lookup(tokens: Sequence[int] | np.ndarray, max_tokens: int, n_min: int = 1,
                 n_max: int = 3) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the last n
    tokens of ``tokens`` (n from ``n_max`` down to ``n_min``), cut at the end of ``tokens``;
    [] when no suffix occurs earlier. Vectorised: O(len(tokens) * n) per call."""
    seq = np.asarray(tokens)
    length = len(seq)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        starts = np.ones(length - n, dtype=bool)  # start i: seq[i:i+n], strictly before the suffix
        for k in range(n):
            starts &= seq[k:length - n + k] == seq[length - n + k]
        hits = np.flatnonzero(starts)
        if hits.size:
            i = int(hits[-1])
            return seq[i + n:min(i + n + max_tokens, length)].tolist()
    return []


def chain_nodes(tokens: list[int], parents: list[int], chain: list[int]) -> list[tuple[int, int]]:
    """The (token, parent) nodes to append to one tree (tokens, parents of D nodes, node 0 the
    root) so that ``chain`` hangs from the root: the prefix already in the tree is reused, the
    rest is a new path from the deepest shared node. New nodes get indices D, D+1, ..."""
    cur, j = 0, 0
    while j < len(chain):
        child = next((c for c in range(1, len(tokens)) if parents[c] == cur and tokens[c] == chain[j]),
                     None)
        if child is None:
            break
        cur, j = child, j + 1
    nodes, parent = [], cur
    for tok in chain[j:]:
        nodes.append((tok, parent))
        parent = len(tokens) + len(nodes) - 1
    return nodes


def add_chains(tokens: Tensor, parents: Tensor, chains: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Append each request's lookup chain to its tree.

    tokens, parents (B, D) int64; chains: B lists of target-vocab ids. W = the most nodes any
    row adds (0: the trees come back unchanged); rows adding fewer are padded with token 0 and
    parent ``PAD_PARENT`` (never accepted). Returns tokens, parents (B, D + W).
    """
    tok_rows, par_rows = tokens.tolist(), parents.tolist()
    new = [chain_nodes(tok_rows[b], par_rows[b], chain) for b, chain in enumerate(chains)]
    width = max(map(len, new), default=0)
    if width == 0:
        return tokens, parents
    extra_tok = torch.zeros(len(new), width, dtype=tokens.dtype)
    extra_par = torch.full((len(new), width), PAD_PARENT, dtype=parents.dtype)
    for b, nodes in enumerate(new):
        for i, (tok, par) in enumerate(nodes):
            extra_tok[b, i], extra_par[b, i] = tok, par
    dev = tokens.device
    return (torch.cat([tokens, extra_tok.to(dev)], dim=1),
            torch.cat([parents, extra_par.to(dev)], dim=1))
