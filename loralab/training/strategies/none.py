"""`none`: evaluate the pretrained model; nothing trains, nothing is saved, no training FLOPs."""

from __future__ import annotations

from torch import nn

from loralab.training.strategies.base import Strategy


class NoTuning(Strategy):
    """The pretrained model as it is: every parameter frozen (the baseline row of a study)."""

    def make_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)

    def head_note(self, model: nn.Module) -> str | None:
        return None  # nothing trains: no note
