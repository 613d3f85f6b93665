"""fp32 / bf16 autocast: which precision a run uses and why."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext

import torch

from loralab.costs import measure
from loralab.errors import UserError
from loralab.training.config import PRECISIONS, TrainConfig


def resolve_precision(requested: str, device: torch.device | str, *,
                      native_bf16: bool | None = None) -> str:
    """The precision a run computes in, "fp32" or "bf16": fp32 and bf16 as asked; auto -> bf16
    where the device multiplies bf16 natively (`measure.native_bf16`: AVX512-BF16 or AMX-BF16
    CPUs, bf16 GPUs), fp32 elsewhere. Why: where bf16 is native, bf16 autocast trains faster
    at nearly the same validation loss; where it is emulated, the bf16 kernels are many times
    slower (BENCHMARKS.md has the measurements). `native_bf16` may be passed in instead of
    read from the device. Raises UserError for an unknown precision."""
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; use auto, fp32 or bf16")
    if requested != "auto":
        return requested
    if native_bf16 is None:
        native_bf16 = measure.native_bf16(device)
    return "bf16" if native_bf16 else "fp32"


def precision_note(requested: str, resolved: str, device: torch.device | str,
                   cpu: measure.CPUInfo | None = None) -> str | None:
    """Why `auto` became what it did, for the run's notes (None for an explicit precision)."""
    if requested != "auto":
        return None
    kind = torch.device(device).type
    if kind != "cpu":
        what = "supports" if resolved == "bf16" else "has no native"
        return f"precision auto -> {resolved}: this {kind} device {what} bf16"
    cpu = cpu or measure.cpu_info()
    if cpu.flags is None:
        why = f"torch reports {'' if resolved == 'bf16' else 'no '}native bf16 (flags unknown)"
    elif resolved == "bf16":
        why = f"has native bf16 ({'/'.join(f for f in measure.BF16_FLAGS if f in cpu.flags)})"
    else:
        why = f"has no native bf16 (no {'/'.join(measure.BF16_FLAGS)})"
    return f"precision auto -> {resolved}: this CPU ({cpu.model}) {why}"


def with_resolved_precision(config: TrainConfig, device: torch.device | str) -> TrainConfig:
    """The config with `precision: auto` replaced by what it resolves to on `device`."""
    if config.precision != "auto":
        return config
    return dataclasses.replace(config, precision=resolve_precision(config.precision, device))


def autocast(config: TrainConfig, device: torch.device) -> AbstractContextManager:
    """bf16 autocast or nothing; the config's precision must be resolved (not auto) by now.
    Raises ValueError for precision auto."""
    if config.precision == "auto":
        raise ValueError("precision auto must be resolved first (with_resolved_precision)")
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()

