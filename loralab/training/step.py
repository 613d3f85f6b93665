"""One optimizer step: the loss of its micro-batches, their backward passes, clipping, update.

The loss of one optimizer step is

    L = sum over micro-batches and ranks of sum_t CE(logits_t, y_t) / T_step

where T_step counts the target tokens (examples for `classify`) of the whole step, known before
the first micro-batch runs (`batching.StepCollate` gives every process the whole micro-batch's
count). Each micro-batch back-propagates its share directly, times N since DDP and FSDP
average gradients over the N ranks, so accumulation gives exactly the gradient of L, whatever
N and the number of micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loralab.costs import measure
from loralab.devices import device_defaults
from loralab.errors import UserError
from loralab.kernels.losses import CausalLMLoss, fused_loss_supported
from loralab.training.checkpoint import injected_fault
from loralab.training.config import TrainConfig
from loralab.training.distributed import Dist, Distribution
from loralab.training.precision import autocast


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over target positions (fp32), a 0-dim tensor.

    lm/generate: logits (B, T, V), labels (B, T); position t predicts token t+1
    (transformers' label convention, -100 ignored). classify: logits (B, C), labels (B,).
    """
    logits = logits.float()  # explicit: the loss is always computed in fp32
    if task == "classify":
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100,
                           label_smoothing=label_smoothing)


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The logits of `model` on a collated batch (input_ids, attention_mask)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else out[0]


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on `device`; the copies are asynchronous from pinned host memory (CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def step_module(model: nn.Module, config: TrainConfig, d: Dist) -> nn.Module:
    """What a training forward calls: for causal LMs the fused-loss module (the loss from
    hidden states in chunks, no N x V logits), otherwise the model. Under FSDP this module
    becomes the sharding root (`distributed.FSDPRoot`), so the head's gathered weight is what
    it reads. The fused loss is a device-neutral memory saving (`devices.device_defaults`)."""
    if not device_defaults(d.device.type).fused_loss:
        return model
    loss = fused_lm_loss(model, config, config.label_smoothing)
    return model if loss is None else loss


def fused_lm_loss(model: nn.Module, config: TrainConfig,
                  label_smoothing: float) -> nn.Module | None:
    """`CausalLMLoss` over `model` when the run's task and model allow the fused loss (a causal
    LM whose logits are exactly its head of the last hidden state, `fused_loss` on); else None."""
    if (config.fused_loss and config.task in ("lm", "generate")
            and fused_loss_supported(model)):
        return CausalLMLoss(model, label_smoothing)
    return None


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports: its loss L (summed over ranks), the global gradient
    norm before clipping (0 without clipping), the learning rate it used, and the non-padding
    input tokens of the whole global batch."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int


def optimizer_step(step: int, micro: Sequence[dict], wrapped: nn.Module, fused: bool,
                   params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig,
                   dist: Distribution, tracker: measure.SavedTensorTracker | None = None,
                   body: AbstractContextManager | None = None, kept: str = "") -> StepResult:
    """Run optimizer step number `step` (1-based) over its micro-batches `micro` (dicts from
    `batching.StepCollate`: batch, targets, tokens).

    `wrapped` is what the forward calls (the fused-loss module when `fused`, returning the
    summed loss, else the model, returning logits); `params` the parameters clipped;
    `tracker` (a `measure.SavedTensorTracker`) measures each forward's saved tensors; `body`
    (e.g. the strategy's frozen-body context) wraps the micro-batches. Raises
    TrainingDiverged before updating when the loss or the gradient norm is not finite; `kept`
    says which checkpoint survives, for that message.
    """
    t_step = sum(m["targets"] for m in micro)  # every process knows the whole step
    step_loss = torch.zeros((), dtype=torch.float64)
    with body if body is not None else nullcontext():
        for k, m in enumerate(micro):
            batch = to_device(m["batch"], dist.device)
            sync = dist.micro_batch_sync(wrapped, last=k == len(micro) - 1)
            with sync, tracker.track() if tracker is not None else nullcontext(), \
                    autocast(config, dist.device):
                if fused:
                    loss = wrapped(batch["input_ids"], batch.get("attention_mask"),
                                   batch["labels"]) / t_step
                else:
                    loss = loss_sum(forward_logits(wrapped, batch), batch["labels"],
                                    config.task, config.label_smoothing) / t_step
            (loss * dist.world).backward()
            step_loss += loss.detach().double().cpu()
    loss_value = float(dist.all_reduce_sum(step_loss))
    if injected_fault("NAN_AT_STEP") == step:
        loss_value = float("nan")
    grad_norm = dist.full_norm(torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                               if config.grad_clip > 0 else torch.zeros(()))
    if not math.isfinite(loss_value) or not torch.isfinite(grad_norm):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        value = loss_value if what == "loss" else float(grad_norm)
        raise TrainingDiverged(
            f"training stopped: the {what} became {value} at step {step}; {kept}; lower --lr, "
            "keep --grad-clip or use --precision fp32")
    lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, float(grad_norm), lr, sum(m["tokens"] for m in micro))

