"""Training-time test (TTT): unroll the draft head ``ttt_length`` steps on teacher tokens.

Alignment (s = index of the token being predicted, t = draft position, k = step):

    draft position t at step k
      hidden input   fc(aux[t]) at k = 0, else the step k-1 output at position t
      token input    input_ids[t + 1 + k]
      RoPE position  position_ids[t] + k
      predicts       token s = t + 2 + k
      target p       softmax(target_logits[t + 1 + k][t2d])   (the target at t+1+k predicts s)
      counted when   loss_mask[s] == 1 (s is an assistant token), positions t, t+1+k, s are real
                     (attention_mask), and argmax(target_logits[t + 1 + k]) is in the draft vocab

Attention at step k (keys ordered [step 0 | step 1 | ... | step k], T each): position t sees
step-0 keys at positions <= t plus the keys of steps 1..k at position t (the "diagonal").
Keys of each step are appended to a KV cache, never recomputed. The pattern is ONE flex
``mask_mod`` (``ttt_mask_mod``), consumed two ways: ``"flex"`` turns it into a block-sparse
``BlockMask`` for ``flex_attention`` (the GPU path: no dense mask, only visible blocks computed),
``"sdpa"`` evaluates it into a dense bool mask for ``scaled_dot_product_attention`` (the CPU
reference). Both attend with native GQA (K/V never copied per query head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from eyas.draft.model import Eagle3Draft

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class TTTOutput:
    """loss: () fp32, ``sum_k decay**k * step_losses[k]``; per step k: step_losses[k] () fp32,
    step_acc[k] () fp32 argmax agreement over counted positions, step_counts[k] () int64."""

    loss: Tensor
    step_losses: list[Tensor]
    step_acc: list[Tensor]
    step_counts: list[Tensor]


def ttt_mask_mod(real: Tensor) -> MaskMod:
    """The TTT visibility rule as a flex ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = visible).

    real (B, T) bool, True = real token. Keys are ordered [step 0 | step 1 | ...], T each.
    Query t sees the step-0 keys at real positions < t and its own position in every step (step
    0's own key even when padded, so no row is empty; padded queries are never counted).
    Works on scalars (flex's vmap) and on broadcastable index tensors alike.
    """
    t = real.shape[1]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        step, pos = kv_idx // t, kv_idx % t
        return (pos == q_idx) | ((step == 0) & (pos < q_idx) & real[b, pos])

    return mask_mod


def ttt_attention_mask(real: Tensor, step: int, backend: str) -> Tensor | BlockMask:
    """The attention mask of TTT step ``step`` for real (B, T) bool over T*(step+1) keys:
    a dense (B, 1, T, T*(step+1)) bool tensor for ``"sdpa"``, a ``BlockMask`` for ``"flex"``;
    batch size 1 (broadcast over the rows) when no row has padding."""
    if bool(real.all()):
        real = real[:1]
    b, t = real.shape
    mask_mod, keys = ttt_mask_mod(real), t * (step + 1)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, b, None, t, keys, device=real.device)
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r}: use 'sdpa' or 'flex'")
    batch = torch.arange(b, device=real.device)[:, None, None, None]  # (B, 1, 1, 1)
    queries = torch.arange(t, device=real.device)[None, None, :, None]  # (1, 1, T, 1)
    key_ids = torch.arange(keys, device=real.device)[None, None, None, :]  # (1, 1, 1, K)
    return mask_mod(batch, batch.new_zeros(()), queries, key_ids)  # (B, 1, T, K)


def resolve_attention(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"flex"`` on CUDA (flex has no CPU backward), else ``"sdpa"``; others kept."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def shift_left(x: Tensor, n: int, fill: float | bool = 0) -> Tensor:
    """x (B, T, ...) -> (B, T, ...) with out[:, t] = x[:, t + n], ``fill`` where t + n >= T."""
    b, t = x.shape[:2]
    n = min(n, t)
    pad = x.new_full((b, n, *x.shape[2:]), fill)
    return torch.cat([x[:, n:], pad], dim=1)


def position_ids_from_mask(attention_mask: Tensor | None, batch: int, length: int,
                           device: torch.device) -> Tensor:
    """(B, T) int64 positions: 0.. over real tokens (left padding aware), arange when no mask."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def target_distribution(final_hidden: Tensor, lm_head_weight: Tensor, t2d: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """Target soft labels from the stored final hidden state and the frozen target lm_head.

    final_hidden (B, T, Ht), lm_head_weight (V, Ht), t2d (V,) bool ->
    p (B, T, Vd) fp32 = softmax(logits[..., t2d]), in_vocab (B, T) bool = argmax(logits) in t2d.
    """
    if lm_head_weight.shape[0] != t2d.numel():
        raise ValueError(f"lm_head_weight has {lm_head_weight.shape[0]} rows but t2d has "
                         f"{t2d.numel()} entries; both must be the target vocabulary")
    logits = F.linear(final_hidden.to(lm_head_weight.dtype), lm_head_weight)  # (B, T, V)
    in_vocab = t2d[logits.argmax(-1)]  # (B, T)
    p = torch.softmax(logits[..., t2d].float(), dim=-1)  # (B, T, Vd)
    return p, in_vocab


def soft_cross_entropy(logits: Tensor, p: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """logits (B, T, Vd) float, p (B, T, Vd) fp32, mask (B, T) bool ->
    (loss () = -(mask * sum(p * log_softmax)).sum() / mask.sum(), acc () fp32, count () int64).
    A step with no counted position gives loss 0 (still part of the graph)."""
    per_pos = -(p * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B, T)
    count = mask.sum()
    denom = count.clamp_min(1).float()
    loss = torch.where(mask, per_pos, torch.zeros_like(per_pos)).sum() / denom
    agree = (logits.argmax(-1) == p.argmax(-1)) & mask  # (B, T)
    return loss, agree.sum().float() / denom, count


def _check_inputs(aux: Tensor, final_hidden: Tensor, input_ids: Tensor, loss_mask: Tensor,
                  attention_mask: Tensor | None) -> None:
    b, t = input_ids.shape
    for name, x in (("aux", aux), ("final_hidden", final_hidden)):
        if x.dim() != 3 or x.shape[:2] != (b, t):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({b}, {t}, ...) "
                             "matching input_ids")
    for name, m in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
        if m is not None and m.shape != (b, t):
            raise ValueError(f"{name} has shape {tuple(m.shape)}; expected ({b}, {t})")


def ttt_forward(draft: Eagle3Draft, embed_weight: Tensor, lm_head_weight: Tensor, aux: Tensor,
                final_hidden: Tensor, input_ids: Tensor, loss_mask: Tensor,
                attention_mask: Tensor | None, ttt_length: int = 7, step_decay: float = 0.8,
                attention: str = "auto") -> TTTOutput:
    """Unrolled TTT loss (alignment in the module docstring).

    embed_weight, lm_head_weight (V, Ht) frozen target tensors; aux (B, T, 3Ht) and
    final_hidden (B, T, Ht) target features; input_ids, loss_mask (B, T); attention_mask
    (B, T) with 1 = real token, or None; attention: ``ATTENTION_BACKENDS`` (see
    ``resolve_attention``).
    """
    _check_inputs(aux, final_hidden, input_ids, loss_mask, attention_mask)
    if ttt_length < 1:
        raise ValueError(f"ttt_length={ttt_length}: unroll at least one step")
    b, t = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    backend = resolve_attention(attention, device)
    positions = position_ids_from_mask(attention_mask, b, t, device)  # (B, T)
    p_all, in_vocab = target_distribution(final_hidden, lm_head_weight, draft.t2d)
    counted = loss_mask.bool() & real  # (B, T) indexed by the predicted token s

    hidden = draft.fuse(aux)  # (B, T, H)
    past: tuple[Tensor, Tensor] | None = None
    losses, accs, counts = [], [], []
    for k in range(ttt_length):
        # Step 1: inputs of step k: token t+1+k, hidden from fc (k=0) or step k-1.
        embeds = F.embedding(shift_left(input_ids, k + 1), embed_weight)  # (B, T, Ht)
        attn = ttt_attention_mask(real, k, backend)  # over (T, T*(k+1))
        # Step 2: one draft pass; its keys extend the cache for later steps.
        out, past = draft(embeds, hidden, positions + k, attn, past)
        # Step 3: soft cross-entropy against the target at t+1+k, counted per predicted token t+2+k.
        mask = (real & shift_left(real, k + 1, False) & shift_left(counted, k + 2, False)
                & shift_left(in_vocab, k + 1, False))  # (B, T)
        loss, acc, count = soft_cross_entropy(draft.logits(out), shift_left(p_all, k + 1), mask)
        losses.append(loss)
        accs.append(acc)
        counts.append(count)
        hidden = out
    total = sum(step_decay**k * loss for k, loss in enumerate(losses))
    return TTTOutput(loss=total, step_losses=losses, step_acc=accs, step_counts=counts)
