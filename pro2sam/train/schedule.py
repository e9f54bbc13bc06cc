"""The optimiser and learning-rate schedule every trainer of the project uses (GTFormer, SAM).

AdamW with weight decay on matrices and convolutions only (not on biases, norms and other 1-D
parameters, nor on the names a model lists in ``no_weight_decay()``: position embeddings, class
and global tokens); a per-step linear warm-up, then a cosine decay to ``min_lr`` or a constant rate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["SCHEDULES", "param_groups", "make_optimizer", "lr_at_step", "make_lr_scheduler"]

SCHEDULES = ("cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``[decayed, not decayed]``.

    Not decayed: biases, every parameter with fewer than 2 dimensions (LayerNorm weights, ...)
    and the names in ``model.no_weight_decay()``. Frozen parameters are left out.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def lr_at_step(
    step: int, *, lr: float, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_lr: float = 0.0
) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``. Then ``lr`` for
    "constant", or for "cosine" ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` going from 0 to 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (:func:`lr_at_step`); call ``scheduler.step()`` after every optimiser step."""

    def factor(step: int) -> float:
        return lr_at_step(
            step, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_lr=min_lr
        ) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
