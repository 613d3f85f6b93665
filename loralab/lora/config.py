"""What LoRA adapts and how: `LoRAConfig`, validated on construction, and the scale s.

The update of an adapted dense map is s * B A with s = alpha / r (Hu et al. 2021) or, with
rsLoRA, alpha / sqrt(r) (Kalajdzievski 2023), which keeps the update's magnitude stable as r
grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from loralab.errors import UserError

PRESETS = ("qv", "attn", "attn-proj", "attn-proj-ffn", "all")
"""The LoRA target presets, each adding to the one before (their module patterns per
architecture: `loralab.lora.targets`). Kept here, torch-free, for the command line's choices."""


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how."""

    rank: int = 8
    """r: the rank of each update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch's input (training only)."""
    targets: str | tuple[str, ...] = "qv"
    """A preset (qv, attn, attn-proj, attn-proj-ffn, all) or module names / globs."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    train_head: bool = False
    """Also train the whole task head fully (PEFT's `modules_to_save`): every module the task
    adds on the backbone, e.g. DistilBERT's pre_classifier + classifier (`head_modules`)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Init of A: Kaiming-uniform as nn.Linear (PEFT's default) or N(0, 1/r) (the paper)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}; "
                            "use e.g. --rank 8")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}; use e.g. --alpha 16")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise UserError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return scaling(self.alpha, self.rank, self.rslora)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
