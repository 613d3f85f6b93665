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

INITS = ("kaiming", "gaussian", "pissa", "olora")
"""How A and B start (`LoRAConfig.init`)."""


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
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    """Init of A and B. kaiming / gaussian: A Kaiming-uniform as nn.Linear (PEFT's default) or
    N(0, 1/r) (the paper), B = 0. pissa (Meng et al. 2024): A, B from the top-r singular
    triplets of W; olora (Buyukakyuz 2024): from a QR decomposition of W. With pissa and olora
    the base weight keeps the residual W - s B A, so the untrained adapter changes nothing."""
    svd_niter: int = 0
    """pissa only: 0 = exact SVD; k > 0 = a randomized SVD with k subspace iterations (Halko et
    al. 2011; PEFT's `pissa_niter_k`), much faster on large layers."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): W' = m (W + s B A) / ||W + s B A||_c with
    a trained magnitude vector m (one per output feature)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}; "
                            "use e.g. --rank 8")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}; use e.g. --alpha 16")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise UserError(f"LoRA init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise UserError(f"svd_niter must be an integer >= 0 (0 = exact SVD), got "
                            f"{self.svd_niter!r}")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return scaling(self.alpha, self.rank, self.rslora)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
