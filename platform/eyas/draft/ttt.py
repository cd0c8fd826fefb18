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
Keys of each step are appended to a KV cache, never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eyas.draft.model import Eagle3Draft


@dataclass
class TTTOutput:
    """loss: () fp32, ``sum_k decay**k * step_losses[k]``; per step k: step_losses[k] () fp32,
    step_acc[k] () fp32 argmax agreement over counted positions, step_counts[k] () int64."""

    loss: Tensor
    step_losses: list[Tensor]
    step_acc: list[Tensor]
    step_counts: list[Tensor]


def ttt_attention_bias(T: int, step: int, dtype: torch.dtype, device: torch.device | str
                       ) -> Tensor:
    """(1, 1, T, T * (step + 1)) additive mask, 0 = visible, -inf = hidden.

    Block 0 (step-0 keys) is causal; blocks 1..step are diagonal (same position only).
    """
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    diag = torch.eye(T, dtype=torch.bool, device=device)  # (T, T)
    visible = torch.cat([causal] + [diag] * step, dim=1)  # (T, T*(step+1))
    bias = torch.zeros(T, T * (step + 1), dtype=dtype, device=device)
    return bias.masked_fill(~visible, float("-inf"))[None, None]  # (1, 1, T, T*(step+1))


def padding_bias(attention_mask: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, T, T*(step+1)) mask hiding padded step-0 keys, except a query's own position
    (so no row is fully masked; padded queries are never counted). attention_mask (B, T)."""
    b, t = attention_mask.shape
    pad_key = ~attention_mask.bool()[:, None, :]  # (B, 1, T) key is padding
    own = torch.eye(t, dtype=torch.bool, device=attention_mask.device)[None]  # (1, T, T)
    hidden = pad_key & ~own  # (B, T, T)
    hidden = torch.cat([hidden, hidden.new_zeros(b, t, t * step)], dim=2)  # (B, T, T*(step+1))
    bias = torch.zeros(hidden.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(hidden, float("-inf"))[:, None]  # (B, 1, T, T*(step+1))


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
                attention_mask: Tensor | None, ttt_length: int = 7, step_decay: float = 0.8
                ) -> TTTOutput:
    """Unrolled TTT loss (alignment in the module docstring).

    embed_weight, lm_head_weight (V, Ht) frozen target tensors; aux (B, T, 3Ht) and
    final_hidden (B, T, Ht) target features; input_ids, loss_mask (B, T); attention_mask
    (B, T) with 1 = real token, or None.
    """
    _check_inputs(aux, final_hidden, input_ids, loss_mask, attention_mask)
    if ttt_length < 1:
        raise ValueError(f"ttt_length={ttt_length}: unroll at least one step")
    b, t = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    padded = not bool(real.all())
    positions = position_ids_from_mask(attention_mask, b, t, device)  # (B, T)
    p_all, in_vocab = target_distribution(final_hidden, lm_head_weight, draft.t2d)
    counted = loss_mask.bool() & real  # (B, T) indexed by the predicted token s
    dtype = draft.fc.weight.dtype

    hidden = draft.fuse(aux)  # (B, T, H)
    past: tuple[Tensor, Tensor] | None = None
    losses, accs, counts = [], [], []
    for k in range(ttt_length):
        # Step 1: inputs of step k: token t+1+k, hidden from fc (k=0) or step k-1.
        embeds = F.embedding(shift_left(input_ids, k + 1), embed_weight)  # (B, T, Ht)
        bias = ttt_attention_bias(t, k, dtype, device)  # (1, 1, T, T*(k+1))
        if padded:
            bias = bias + padding_bias(attention_mask, k, dtype)  # (B, 1, T, T*(k+1))
        # Step 2: one draft pass; its keys extend the cache for later steps.
        out, past = draft(embeds, hidden, positions + k, bias, past)
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
