"""The training loop's state (what changes during training and goes into a checkpoint) and
what the run measured about itself: peak memory while it trains, and its costs at the end."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab.costs import measure


@dataclass
class LoopState:
    """Everything that changes during training and goes into a checkpoint (as a dict:
    `dataclasses.asdict`). Seconds are wall-clock; `curves` are lists of [step, value]."""

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


class MemoryWatch:
    """Peak memory of a training run, in bytes, folded into the `LoopState`:

    - host RSS growth over the run (`measure.RSSSampler`, sampled on the main process only);
    - the CUDA allocator's peak (its statistics reset at the start);
    - activations: the largest total autograd saved in one forward (`tracker`, a
      `measure.SavedTensorTracker`);
    - static tensors (parameters, gradients, optimizer state), counted once after the first
      optimizer step, when the gradients and AdamW's moments exist.
    """

    def __init__(self, tracker: measure.SavedTensorTracker, device: torch.device,
                 main: bool) -> None:
        self.tracker = tracker
        self.device = device
        self.sampler = measure.RSSSampler().start() if main else None
        self.static_bytes = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def after_step(self, state: LoopState, tensors: Callable[[], tuple[Any, Any]]) -> None:
        """After an optimizer step: `tensors()` gives (module, optimizer) to count the static
        bytes of (this process's share under FSDP)."""
        if not self.static_bytes:
            self.static_bytes = measure.static_tensor_bytes(*tensors())
        rss = self.sampler.peak_delta if self.sampler is not None else 0
        state.peak_rss_delta = max(state.peak_rss_delta, rss)
        state.peak_saved_bytes = max(state.peak_saved_bytes, self.tracker.peak)

    def stop(self, state: LoopState) -> None:
        """Stop sampling and fold the last peaks into `state`."""
        rss = self.sampler.stop() if self.sampler is not None else 0
        state.peak_rss_delta = max(state.peak_rss_delta, rss)
        state.peak_saved_bytes = max(state.peak_saved_bytes, self.tracker.peak)

    def peak_memory(self, state: LoopState) -> int:
        """The run's peak memory: the CUDA allocator's peak on a GPU, else the RSS growth."""
        return int(measure.peak_cuda_bytes() if self.device.type == "cuda"
                   else state.peak_rss_delta)


def run_costs(state: LoopState, watch: MemoryWatch, artifacts: Mapping[str, Any],
              data_seconds: float) -> dict[str, Any]:
    """The record's measured costs of a finished run: artefact bytes on disk (not counting
    the TensorBoard directory), seconds (training, evaluation, data preparation), steady-state
    tokens/s, the first step's seconds, peak memory and peak tensor bytes (static + the
    largest saved activations)."""
    artifact_bytes = sum(measure.path_bytes(p) for k, p in artifacts.items()
                         if p and k != "tensorboard" and Path(p).exists())
    return {
        "artifact_bytes": artifact_bytes,
        "train_seconds": state.train_seconds, "eval_seconds": state.eval_seconds,
        "data_seconds": data_seconds,
        "tokens_per_second": throughput(state),
        "first_step_seconds": state.first_seconds,
        "peak_memory_bytes": watch.peak_memory(state),
        "peak_tensor_bytes": int(watch.static_bytes + state.peak_saved_bytes),
    }
