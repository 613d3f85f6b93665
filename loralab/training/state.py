"""The training loop's state: what changes during training and goes into a checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LoopState:
    """Everything that changes during training and goes into a checkpoint."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val: float = math.inf
    best_step: int = -1
    tokens: int = 0
    train_seconds: float = 0.0
    first_tokens: int = 0
    first_seconds: float = 0.0
    eval_seconds: float = 0.0
    curves: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": [], "lr": []})
    peak_saved_bytes: int = 0
    peak_rss_delta: int = 0


def throughput(state: LoopState) -> float:
    """Steady-state tokens/s: after the first optimizer step when there are several (the first
    step pays one-off costs: lazy imports, kernel selection, allocator warm-up)."""
    tokens, seconds = state.tokens, state.train_seconds
    if state.step >= 2 and state.first_seconds:
        tokens, seconds = tokens - state.first_tokens, seconds - state.first_seconds
    return tokens / seconds if seconds > 0 else 0.0


# --- evaluating a finished run or a model + adapter ----------------------------------------------
