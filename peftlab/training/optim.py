"""AdamW over the method's parameter groups (+ the task head), warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from peftlab.config import OptimConfig


def build_optimizer(cfg: OptimConfig, groups: list[dict], head: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``groups`` come from ``method.param_groups``; the head trains at ``head_lr`` (default lr)."""
    groups = [g for g in groups if g["params"]]
    if head:
        groups.append({"name": "head", "params": head, "lr": cfg.head_lr or cfg.lr, "weight_decay": cfg.weight_decay})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup 0 -> 1 over ``warmup_steps``, then cosine 1 -> ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.min_lr_ratio))
