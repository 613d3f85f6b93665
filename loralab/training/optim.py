"""AdamW parameter groups (weight decay, LoRA+), the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from loralab.errors import UserError


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


def param_groups(model: nn.Module, weight_decay: float, lr: float, lr_ratio: float = 1.0,
                 factors: tuple[Sequence[nn.Parameter], Sequence[nn.Parameter]] = ((), ())
                 ) -> list[dict]:
    """The optimizer's parameter groups: `decay_groups`, and with LoRA+ each split by factor.

    LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): with
    lr_ratio = lambda, every B of W + s B A learns at lambda x lr and every A (and every other
    trainable parameter: the head, DoRA magnitudes) at lr. `factors` = (the A matrices, the B
    matrices), chosen by object (`Strategy.lora_factors`), never by parameter name. The groups
    are then decay/no-decay x {other, A, B}, in that order, each with `lr` = lr x its
    `lr_multiplier` (1, 1, lr_ratio); the first non-empty group always has multiplier 1, so
    the loop's recorded lr (group 0) stays the base rate. PEFT's `create_loraplus_optimizer`
    also gives 1-D parameters (biases, magnitudes) B's rate; here only B gets it.

    lr_ratio 1 returns exactly `decay_groups` (two groups at the optimizer's lr): the
    optimizer, its state dict and every loss are those of plain LoRA, and checkpoints written
    before LoRA+ existed resume. The schedule (`lr_factor`) scales every group's initial lr by
    the same factor, so the ratio holds at every step. Raises UserError for lr_ratio != 1 on a
    model with no B matrix (nothing for LoRA+ to speed up)."""
    groups = decay_groups(model, weight_decay)
    if lr_ratio == 1.0:
        return groups
    a_ids, b_ids = {id(p) for p in factors[0]}, {id(p) for p in factors[1]}
    if not b_ids:
        raise UserError(f"lr_ratio {lr_ratio:g} (LoRA+) sets the rate of LoRA's B matrices, "
                        "and this model has none; use lr_ratio 1 or a LoRA method")
    split: list[dict] = []
    for part, multiplier in ((None, 1.0), (a_ids, 1.0), (b_ids, lr_ratio)):
        for g in groups:
            if part is None:
                params = [p for p in g["params"] if id(p) not in a_ids | b_ids]
            else:
                params = [p for p in g["params"] if id(p) in part]
            split.append({"params": params, "weight_decay": g["weight_decay"],
                          "lr": lr * multiplier, "lr_multiplier": multiplier})
    return split


def make_optimizer(params_groups: list[dict], lr: float, device: torch.device
                   ) -> torch.optim.Optimizer:
    """AdamW, fused where the build supports it (CPU and CUDA in torch >= 2.4; also over FSDP's
    DTensor shards), else foreach. Empty groups are dropped; a group's own `lr` (LoRA+) wins
    over `lr`."""
    groups = [g for g in params_groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as transformers' schedules:
    step / warmup during warm-up, then linear to 0, half a cosine to 0, or 1. LambdaLR applies
    it to every group's initial lr (lr x the group's LoRA+ multiplier), keeping the ratio."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)
