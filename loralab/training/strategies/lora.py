"""`lora`: LoRA adapters on the frozen base (+ the whole freshly initialised task head for
`classify`).

Each adapted layer computes W x + s B A x with W frozen, A (r x d_in) and B (d_out x r)
trained and s = alpha / r (alpha / sqrt(r) with rsLoRA); B starts at 0 (or, with init pissa /
olora, A and B start from W's principal subspace and W keeps the residual), so training starts
from the pretrained function. DoRA (`dora`) rescales each output row of W + s B A to a trained
magnitude (loralab.lora.dora). Training FLOPs per token: 4 N (the forward, and the gradient wrt
activations through the frozen body; no weight gradients for W) + 6 A (the adapters' own
forward and both backward matmuls; A = adapter parameters). The artefact is the adapter in
PEFT's format; a saved run's model is rebuilt as W + s B A (unmerged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loralab.lora.adapter import save_adapter
from loralab.lora.config import LoRAConfig
from loralab.lora.inject import apply_lora
from loralab.training.config import TrainConfig
from loralab.training.strategies.base import Strategy


def lora_config(config: TrainConfig) -> LoRAConfig:
    """The run's adapters: rank, alpha, dropout, targets, rsLoRA, DoRA and init; the task head
    trains with them for `classify` (a classifier's head is freshly initialised). The targets
    arrive as the config parsed them (`config.parse_targets`: a preset name or a tuple of
    module names)."""
    return LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                      targets=config.preset, rslora=config.rslora,
                      train_head=config.task == "classify", dora=config.dora,
                      init=cast(Any, config.init), svd_niter=config.svd_niter)


class LoRA(Strategy):
    """Adapters W + s B A on the frozen body; only A, B (and a classifier's head) train."""

    cpu_speedups = True

    def make_trainable(self, model: nn.Module) -> None:
        apply_lora(model, lora_config(self.config))

    def save_artifact(self, model: nn.Module, loaded: Any, out: Path,
                      whole: dict[str, torch.Tensor] | None = None) -> dict:
        """`out/adapter`: the adapter in PEFT's format (loralab.lora.adapter)."""
        artifacts = super().save_artifact(model, loaded, out, whole)
        artifacts["adapter"] = str(save_adapter(model, out / "adapter"))
        return artifacts
