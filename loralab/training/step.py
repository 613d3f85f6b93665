"""The training loss of one micro-batch and what the forward calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.devices import device_defaults
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.training.config import TrainConfig
from loralab.training.distributed import Dist


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over target positions (fp32).

    lm/generate: position t predicts token t+1 (transformers' label convention, -100 ignored).
    classify: one label per example.
    """
    logits = logits.float()  # explicit: the loss is always computed in fp32
    if task == "classify":
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100,
                           label_smoothing=label_smoothing)


def _forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else out[0]


def _to(batch: dict, device: torch.device) -> dict:
    """The batch on `device`; the copies are asynchronous from pinned host memory (CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _step_module(model: nn.Module, config: TrainConfig, d: Dist) -> nn.Module:
    """What a training forward calls: for causal LMs the fused-loss module (the loss from
    hidden states in chunks, no N x V logits), otherwise the model. Under FSDP this module
    becomes the sharding root (`_FSDPRoot`), so the head's gathered weight is what it reads.
    The fused loss is a device-neutral memory saving (`devices.device_defaults`: on everywhere)."""
    if not device_defaults(d.device.type).fused_loss:
        return model
    loss = _fused_lm_loss(model, config, config.label_smoothing)
    return model if loss is None else loss


def _fused_lm_loss(model: nn.Module, config: TrainConfig,
                   label_smoothing: float) -> nn.Module | None:
    """`CausalLMLoss` over `model` when the run's task and model allow the fused loss (a causal
    LM whose logits are exactly its head of the last hidden state, `fused_loss` on); else None."""
    from loralab.kernels.losses import CausalLMLoss, fused_loss_supported

    if (config.fused_loss and config.task in ("lm", "generate")
            and fused_loss_supported(model)):
        return CausalLMLoss(model, label_smoothing)
    return None
