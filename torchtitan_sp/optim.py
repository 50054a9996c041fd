"""AdamW and the learning-rate schedule: linear warmup, then linear or cosine decay."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from torchtitan_sp.config import LRScheduler, Optimizer


def hyperparameters(o: Optimizer) -> dict:
    """AdamW's per-group settings from the [optimizer] keys."""
    return {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}


def build_optimizer(params, o: Optimizer) -> torch.optim.Optimizer:
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[o.implementation]
    return torch.optim.AdamW(params, **hyperparameters(o), **impl)


def restore_hyperparameters(opt: torch.optim.Optimizer, o: Optimizer) -> None:
    """After a checkpoint's optimizer state was loaded (it carries the saved run's lr, betas, eps
    and weight decay): this run's [optimizer] keys win, as they do for every other section."""
    for group in opt.param_groups:
        group.update(hyperparameters(o), initial_lr=o.lr)  # initial_lr: the schedule's peak


def lr_factor(step: int, total_steps: int, s: LRScheduler) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < s.warmup_steps:
        return (step + 1) / (s.warmup_steps + 1)
    if s.decay_type == "none":
        return 1.0
    # Counted from 1 like the warmup (as TorchTitan does), so that the last step runs at min_lr_factor.
    decay_steps = max(total_steps - s.warmup_steps, 1)
    progress = min((step + 1 - s.warmup_steps) / decay_steps, 1.0)
    if s.decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return s.min_lr_factor + (1.0 - s.min_lr_factor) * shape


def build_lr_scheduler(opt: torch.optim.Optimizer, total_steps: int, s: LRScheduler,
                       done_steps: int = 0) -> LambdaLR:
    """The schedule of this run's keys from its peak ("initial_lr"), at step `done_steps` (> 0 when
    resumed: the schedule is a function of the step, so a resume may change warmup, decay or steps)."""
    return LambdaLR(opt, lambda step: lr_factor(step, total_steps, s), last_epoch=done_steps - 1)
