"""The draft vocabulary: the most frequent assistant tokens, and the d2t / t2d mapping.

``d2t[i]`` (int64, length draft_vocab) is an OFFSET: draft id ``i`` is target id ``i + d2t[i]``.
``t2d[j]`` (bool, length target vocab) says whether target id ``j`` is in the draft vocabulary.
The kept ids are ascending, so the True positions of ``t2d`` in order are exactly
``arange(draft_vocab) + d2t``. Fine-tuning reuses a checkpoint's mapping
(``load_vocab_mapping``), never rebuilds it: the lm_head rows belong to those ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor


def count_tokens(input_ids_batches: Iterable[Tensor], loss_masks: Iterable[Tensor],
                 vocab_size: int) -> Tensor:
    """Frequencies of assistant tokens (``loss_mask == 1``) over batches.

    Each pair is input_ids (..., T) integer and loss_mask of the same shape (0/1 or bool).
    Returns counts (vocab_size,) int64 on CPU.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for i, (ids, mask) in enumerate(zip(input_ids_batches, loss_masks, strict=True)):
        ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
        if ids.shape != mask.shape:
            raise ValueError(f"batch {i}: input_ids shape {tuple(ids.shape)} != loss_mask shape "
                             f"{tuple(mask.shape)}; pass one mask per token")
        kept = ids[mask.bool()].to(torch.int64).cpu()  # (n_assistant,)
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab_size):
            raise ValueError(f"batch {i}: token id {int(kept.max())} / {int(kept.min())} outside "
                             f"[0, {vocab_size}); pass the target's vocab_size")
        counts += torch.bincount(kept, minlength=vocab_size)
    return counts


def build_vocab_mapping(counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """Keep the ``draft_vocab_size`` most frequent ids (ties: lower id first), ascending.

    counts (V,) integer -> d2t (min(V, draft_vocab_size),) int64 offsets, t2d (V,) bool.
    When V <= draft_vocab_size the mapping is the identity: d2t all 0 (length V), t2d all True;
    the draft's ``draft_vocab_size`` must then be V (``DraftConfig.from_target_config`` clamps).
    Ids never seen still fill remaining slots (lowest ids first) so the size is exact.
    """
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (vocab,), got shape {tuple(counts.shape)}")
    vocab = counts.numel()
    if draft_vocab_size <= 0:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be positive")
    if vocab <= draft_vocab_size:
        return torch.zeros(vocab, dtype=torch.int64), torch.ones(vocab, dtype=torch.bool)
    # A stable descending sort keeps lower ids first among equal counts: deterministic ties.
    order = torch.sort(counts.cpu(), descending=True, stable=True).indices  # (V,)
    used = order[:draft_vocab_size].sort().values  # (Vd,) ascending target ids
    d2t = used - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


def check_vocab_mapping(d2t: Tensor, t2d: Tensor) -> list[str]:
    """Problems with a mapping (empty when consistent): dtypes, shapes, and
    ``arange(len(d2t)) + d2t`` == the True positions of ``t2d`` in ascending order."""
    problems = []
    if d2t.dtype != torch.int64:
        problems.append(f"d2t has dtype {d2t.dtype}; expected torch.int64")
    if t2d.dtype != torch.bool:
        problems.append(f"t2d has dtype {t2d.dtype}; expected torch.bool")
    if d2t.dim() != 1 or t2d.dim() != 1:
        return problems + [f"d2t {tuple(d2t.shape)} and t2d {tuple(t2d.shape)} must be 1-D"]
    targets = torch.arange(d2t.numel()) + d2t.cpu().to(torch.int64)  # (Vd,)
    in_vocab = t2d.cpu().bool().nonzero().flatten()  # (n_true,)
    if in_vocab.numel() != d2t.numel():
        problems.append(f"t2d has {in_vocab.numel()} True entries but d2t has {d2t.numel()}; "
                        "both must describe the same draft vocabulary")
    elif not torch.equal(targets, in_vocab):
        bad = int((targets != in_vocab).nonzero()[0])
        problems.append(f"d2t maps draft id {bad} to target id {int(targets[bad])} but the "
                        f"{bad}-th True position of t2d is {int(in_vocab[bad])}; i + d2t[i] must "
                        "list the True positions of t2d in ascending order")
    return problems


def load_vocab_mapping(draft_dir: str | Path) -> tuple[Tensor, Tensor]:
    """(d2t int64 (Vd,), t2d bool (V,)) from an exported draft directory, for fine-tuning.

    Reads only those two tensors of ``model.safetensors``; raises if they are inconsistent.
    """
    from safetensors import safe_open

    weights = Path(draft_dir) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: {draft_dir} is not an exported draft "
                                "directory (eyas.export.writer.save_draft writes one)")
    with safe_open(str(weights), framework="pt") as f:
        missing = {"d2t", "t2d"} - set(f.keys())
        if missing:
            raise ValueError(f"{weights} lacks {sorted(missing)}; it is not an EAGLE-3 draft")
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    problems = check_vocab_mapping(d2t, t2d)
    if problems:
        raise ValueError(f"{weights}: inconsistent vocab mapping: " + "; ".join(problems))
    return d2t, t2d
