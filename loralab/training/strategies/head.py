"""`head`: only the task head trains; the frozen body runs under no_grad.

Every module of the head trains (DistilBERT's pre_classifier and classifier, an LM's lm_head,
untied from the input embeddings first so only the head moves). The body runs forward only
(`base.frozen_body`), so no body activation is stored: training FLOPs per token 2 N (forward)
+ 4 N_head (the head's two backward matmuls). The artefact is the head's tensors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from loralab.models.heads import head_parameters, head_state, task_head_modules, untie_head
from loralab.training.config import TrainConfig
from loralab.training.strategies.base import Strategy


def untie_for_head(model: nn.Module, config: TrainConfig) -> list[str]:
    """An LM's lm_head untied from the input embeddings (so training it leaves them alone);
    classifiers have their own head. Returns the note."""
    if config.task != "classify" and untie_head(model):
        return ["lm_head untied from the input embeddings so only the head trains"]
    return []


def save_head(model: nn.Module, out: Path) -> str:
    """`out/head/head.safetensors`: every head module's tensors keyed by its name in the model
    (pre_classifier.weight, ...), written to a temporary directory and renamed into place."""
    tmp = out / ".head.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(head_state(model), str(tmp / "head.safetensors"))
    if (out / "head").exists():
        shutil.rmtree(out / "head")
    os.replace(tmp, out / "head")
    return str(out / "head")


class HeadOnly(Strategy):
    """Only the task head's parameters train; the body is frozen and runs without grad."""

    body_backward = False

    def prepare_base(self, model: nn.Module) -> list[str]:
        return untie_for_head(model, self.config)

    def make_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for p in head_parameters(model):  # every module of the head, not just its last layer
            p.requires_grad_(True)

    def body_frozen(self, phase: str) -> bool:
        return True

    def no_grad_heads(self, model: nn.Module) -> list[nn.Module]:
        return list(task_head_modules(model).values())

    def save_artifact(self, model: nn.Module, loaded: Any, out: Path,
                      whole: dict[str, torch.Tensor] | None = None) -> dict:
        artifacts = super().save_artifact(model, loaded, out, whole)
        artifacts["head"] = save_head(model, out)
        return artifacts
