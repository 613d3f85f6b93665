"""`full`: full fine-tuning, every parameter trains (FSDP when distributed).

Training FLOPs per token 6 N: 2 N forward, 2 N for the gradient wrt activations, 2 N wrt
weights. The artefact is the whole model (`save_pretrained` + tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.training.strategies.base import Strategy


class FullFineTuning(Strategy):
    """W itself trains; checkpoints hold the whole state dict."""

    cpu_speedups = True
    trains_all = True

    def make_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(True)

    def head_note(self, model: nn.Module) -> str | None:
        return None  # everything trains: no note

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything, cloned to CPU."""
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def save_artifact(self, model: nn.Module, loaded: Any, out: Path,
                      whole: dict[str, torch.Tensor] | None = None) -> dict:
        """`out/model`: `save_pretrained` of the model (of `whole` under FSDP) and its
        tokenizer, written to a temporary directory and renamed into place."""
        artifacts = super().save_artifact(model, loaded, out, whole)
        tmp = out / ".model.tmp"
        # a transformers PreTrainedModel (nn.Module does not declare save_pretrained)
        model.save_pretrained(  # type: ignore[operator]
            str(tmp), state_dict=dict(whole) if whole is not None else None)
        tok = getattr(loaded, "tokenizer", None)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp))
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        os.replace(tmp, out / "model")
        artifacts["model"] = str(out / "model")
        return artifacts
