"""A slot-based KV cache owned by the engine: one slot per running request.

Layout per cache: ``k``/``v`` of shape (num_layers, num_slots, max_len, n_kv, head_dim).
``lengths[slot]`` counts the committed entries of a slot; entries at or past it are scratch
(tree tokens under verification, padding) and are never attended to unless a mask says so.
After a speculative round ``compact`` moves the accepted tree entries to contiguous positions
right after the committed prefix; the rejected entries simply fall past the new length.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Preallocated K/V storage plus a free-slot allocator."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        shape = (num_layers, num_slots, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        """Slots not held by any request."""
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot (its length reset to 0); raises when the cache is full."""
        if not self._free:
            raise RuntimeError("KV cache has no free slot: finish or abort a request first "
                               "(or raise max_batch_size)")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return a slot to the pool."""
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)

    def gather(self, i: int, slots: Tensor | slice, length: int) -> tuple[Tensor, Tensor]:
        """Layer i's first ``length`` entries of ``slots`` (B,) -> each (B, n_kv, length, hd).

        ``slots`` may be a slice (see ``slot_selector``): then the result is a view, not a copy.
        """
        return (self.k[i, slots, :length].transpose(1, 2),
                self.v[i, slots, :length].transpose(1, 2))

    def write(self, i: int, slots: Tensor, write_pos: Tensor, k: Tensor, v: Tensor,
              valid: Tensor | None = None) -> None:
        """Store k, v (B, T, n_kv, hd) of layer i at ``write_pos`` (B, T) of ``slots`` (B,);
        with ``valid`` (B, T) bool only the entries marked True."""
        if valid is None:
            self.k[i, slots[:, None], write_pos] = k.to(self.k.dtype)
            self.v[i, slots[:, None], write_pos] = v.to(self.v.dtype)
            return
        rows, cols = valid.nonzero(as_tuple=True)
        self.k[i, slots[rows], write_pos[rows, cols]] = k[rows, cols].to(self.k.dtype)
        self.v[i, slots[rows], write_pos[rows, cols]] = v[rows, cols].to(self.v.dtype)

    def compact(self, slots: Tensor, path: Tensor, num_kept: Tensor) -> None:
        """Keep each slot's accepted tree entries, moved right after its committed prefix.

        slots (B,) int64; path (B, D) int64 tree-node indices of the accepted path (padded
        with anything past ``num_kept``); num_kept (B,) int64 entries kept per row. The tree
        was written at ``lengths[slot] + node``; node ``path[b, j]`` moves to
        ``lengths[slot] + j``. ``lengths`` grows by ``num_kept``. All layers in one copy.
        """
        keep = torch.arange(path.shape[1], device=path.device)[None] < num_kept[:, None]
        rows, cols = keep.nonzero(as_tuple=True)  # (N,), (N,)
        slot_idx = slots[rows]
        base = self.lengths[slot_idx]
        src, dst = base + path[rows, cols], base + cols
        # The right-hand side is gathered in full before the write, so overlaps are safe.
        self.k[:, slot_idx, dst] = self.k[:, slot_idx, src]
        self.v[:, slot_idx, dst] = self.v[:, slot_idx, src]
        self.lengths[slots] += num_kept


def slot_selector(slots: Tensor) -> Tensor | slice:
    """``slots`` (B,) as a slice when they are consecutive ascending slot numbers, else as is.

    Reading a slice of the cache is a view; indexing with a tensor copies every entry read,
    which at batch 16 costs more than the attention itself.
    """
    ids = slots.tolist()
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return slots


def cache_attention_mask(prefix_lens: Tensor, local: Tensor, total: int) -> Tensor:
    """Mask over slot positions for T new tokens stored right after each row's prefix.

    prefix_lens (B,) int64 committed entries per row; local (B or 1, T, T) bool, which new
    tokens each new token sees (causal for ordinary decoding, ancestors for a tree); total S
    the number of slot positions attended over (>= max(prefix_lens) + T).
    Returns (B, T, S) bool: the whole prefix, plus the new tokens ``local`` allows.
    """
    B, T = prefix_lens.shape[0], local.shape[-1]
    rel = torch.arange(total, device=prefix_lens.device)[None] - prefix_lens[:, None]  # (B, S)
    in_new = (rel >= 0) & (rel < T)
    idx = rel.clamp(0, T - 1)[:, None, :].expand(B, T, total)  # (B, T, S)
    new_part = torch.gather(local.expand(B, T, T), 2, idx) & in_new[:, None, :]
    return new_part | (rel < 0)[:, None, :]
