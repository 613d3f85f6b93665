"""AdamW parameter groups, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: biases and every parameter of a normalisation layer get no decay.

    Selected by module type (LayerNorm/GroupNorm/BatchNorm/RMSNorm classes, including
    transformers' own *RMSNorm/*LayerNorm classes) and by the module's `bias` attribute.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, norm_types) or type(module).__name__.endswith("Norm")
        for name, p in module.named_parameters(recurse=False):
            if is_norm or (name == "bias" and getattr(module, "bias", None) is p):
                no_decay.add(id(p))
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def make_optimizer(params_groups: list[dict], lr: float, device: torch.device
                   ) -> torch.optim.Optimizer:
    """AdamW, fused where the build supports it (CPU and CUDA in torch >= 2.4; also over FSDP's
    DTensor shards), else foreach."""
    groups = [g for g in params_groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as transformers' schedules:
    step / warmup during warm-up, then linear to 0, half a cosine to 0, or 1."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)
