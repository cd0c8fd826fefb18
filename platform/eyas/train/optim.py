"""AdamW with linear warmup and a cosine decay, as EAGLE-3 trainers use it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from eyas.train.config import TrainConfig


def warmup_steps(cfg: TrainConfig, max_steps: int) -> int:
    """Steps of linear warmup: ``ceil(warmup_ratio * max_steps)`` (0 when the ratio is 0)."""
    return math.ceil(cfg.warmup_ratio * max_steps)


def lr_factor(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps: linear from 1/(warmup+1) to 1
    over ``warmup`` steps, then a half cosine from 1 down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, max_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its warmup + cosine ``LambdaLR`` (stepped once per optimizer step)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    schedule = lr_factor(warmup_steps(cfg, max_steps), max_steps, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
